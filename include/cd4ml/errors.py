"""Domain errors. Their messages are what a user sees in the UI, so they name what, where and why."""


class Cd4mlError(Exception):
    """Base class of every error cd4ml raises on purpose."""


class SpecError(Cd4mlError):
    """A model spec is invalid; the message names the file and the field."""


class DataReadError(Cd4mlError):
    """A landed file cannot be read as a table."""


class TrainingError(Cd4mlError):
    """A challenger could not be trained from the spec and the accepted data."""

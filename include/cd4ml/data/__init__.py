"""Data in: the landing zone, reading tables, and validating each batch before anything trains."""

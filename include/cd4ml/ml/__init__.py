"""Pure ML: building and fitting the spec's pipeline, champion/challenger evaluation, drift statistics."""

"""What every other part relies on: the model spec, the error policy, settings and lineage."""

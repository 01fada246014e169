"""The pipeline steps the DAGs (and `cd4ml train`) run: train, deploy, monitor."""

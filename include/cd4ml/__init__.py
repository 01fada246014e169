"""cd4ml: continuous delivery for machine-learning models on Apache Airflow.

Importing this package is cheap on purpose: DAG files import it at parse time.
"""

__version__ = "0.1.0"

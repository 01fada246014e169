-- MLflow keeps its tracking store in its own database beside Airflow's metadata DB.
CREATE DATABASE mlflow OWNER airflow;

"""Airflow adapters: the only place in cd4ml that imports airflow. Parse-time light by design."""

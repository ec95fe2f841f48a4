"""Airflow plugins shipped by the provider (registered through ``get_provider_info()["plugins"]``)."""

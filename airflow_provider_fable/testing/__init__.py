"""Test helpers for DAGs built on airflow_provider_fable (also used by the project's own tests).

- ``airflow_env``: an isolated Airflow (temporary AIRFLOW_HOME, SQLite metadata DB) and a
  ``run_dag`` helper that runs a DAG with ``dag.test()`` and returns task states and XComs.
- ``plugin``: the pytest plugin (entry point ``pytest11``) with emulator and Airflow fixtures.

Importing this package does not import Airflow: isolation has to be configured first.
"""

from __future__ import annotations

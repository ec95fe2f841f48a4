"""Pure-Python core of the provider: no Airflow import anywhere below this package.

Request building, id handling, sharding, result parsing, validation, cost and the database
sinks live here so they can be tested in milliseconds and reused outside Airflow. Operators,
sensor, trigger and hook are thin shells over these modules.
"""

from __future__ import annotations

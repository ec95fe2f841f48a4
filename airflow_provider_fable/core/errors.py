"""Exception types shared by the core and the Airflow shells (defined in ``airflow_provider_fable.exceptions``).

Kept so ``from airflow_provider_fable.core.errors import FableError, RecordError, JobSpecError``
keeps working; new code imports from :mod:`airflow_provider_fable.exceptions`, the one module
holding every exception of the provider under the root :class:`FableError`.
"""

from __future__ import annotations

from airflow_provider_fable.exceptions import FableError as FableError
from airflow_provider_fable.exceptions import JobSpecError as JobSpecError
from airflow_provider_fable.exceptions import RecordError as RecordError

__all__ = ["FableError", "JobSpecError", "RecordError"]

"""The "Backlogs" plugin: a page in Airflow's UI showing every backlog the ledger knows.

Registered by the provider (``get_provider_info()["plugins"]``), so installing the provider is
enough. The plugin mounts a FastAPI app on Airflow's API server under ``/fable`` and adds a nav
entry (``external_views``, Airflow 3.1+) that shows it inside Airflow's UI.

Airflow imports plugin classes in every component that loads plugins, so this module imports only
``airflow.plugins_manager``: the FastAPI app (``plugins/app.py``: FastAPI, SQLAlchemy, the report
queries) is built on the first request that reaches it (:class:`_LazyApp`).
"""

from __future__ import annotations

from typing import Any

from airflow.plugins_manager import AirflowPlugin

URL_PREFIX = "/fable"


class _LazyApp:
    """An ASGI app that imports and builds the real one when the first request arrives."""

    def __init__(self) -> None:
        self._app: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self._app is None:
            from airflow_provider_fable.plugins.app import create_app

            self._app = create_app()
        await self._app(scope, receive, send)


class FableBacklogsPlugin(AirflowPlugin):
    """Jobs, one job's progress, reject reasons, label distributions, QA sample, cost, reruns."""

    name = "fable_backlogs"
    fastapi_apps = [{"app": _LazyApp(), "url_prefix": URL_PREFIX, "name": "Fable backlogs"}]
    external_views = [
        {
            "name": "Backlogs",
            "href": f"{URL_PREFIX}/",
            "destination": "nav",
            "category": "browse",
            "url_route": "fable-backlogs",
        }
    ]

"""pytest plugin of airflow_provider_fable (entry point ``pytest11``: loaded automatically).

Fixtures:

- ``fable_emulator``: a session-wide emulator (instant processing, no faults).
- ``fable_emulator_factory``: start emulators with your own settings/faults, stopped after the test.
- ``fable_airflow``: the isolated Airflow of this session (metadata DB created once) with
  ``set_connection`` and ``run_dag``.
- ``fable_connection``: ``fable_default`` pointed at the session emulator.

Isolation (opt-in, because installing a provider must not change how a project's other tests
see Airflow): with ``fable_isolate_airflow = true`` in the pytest ini (or the environment variable
``FABLE_ISOLATE_AIRFLOW=1``), ``pytest_configure`` points AIRFLOW_HOME at a temporary directory
with a SQLite metadata DB and no example DAGs, before anything imports Airflow, so tests never
touch a developer's real Airflow; the directory is removed at the end of the session. Choose the
DAGs folder with ``fable_dags_folder`` (default ``dags`` under the rootdir when present).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

TEST_API_KEY = "fable-test-key"  # a fake key for the emulator; never a real secret


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "fable_isolate_airflow",
        "Point AIRFLOW_HOME at a temporary directory for the test session (default false).",
        type="bool",
        default=False,
    )
    parser.addini("fable_dags_folder", "DAGs folder for the isolated Airflow (default: <rootdir>/dags).")


def _isolation_wanted(config: pytest.Config) -> bool:
    env = os.environ.get("FABLE_ISOLATE_AIRFLOW", "").strip().lower()
    if env:
        return env in ("1", "true", "yes", "on")
    return bool(config.getini("fable_isolate_airflow"))


def pytest_configure(config: pytest.Config) -> None:
    if not _isolation_wanted(config):
        return
    from airflow_provider_fable.testing.airflow_env import isolate_airflow

    folder = config.getini("fable_dags_folder") or str(Path(config.rootpath) / "dags")
    home = Path(tempfile.mkdtemp(prefix="fable-airflow-"))
    config._fable_airflow_home = home  # type: ignore[attr-defined]
    try:
        isolate_airflow(home, dags_folder=folder if Path(folder).is_dir() else None)
    except RuntimeError as exc:  # airflow imported earlier by another plugin or conftest
        config.issue_config_time_warning(pytest.PytestConfigWarning(str(exc)), stacklevel=2)


class FableAirflow:
    """Handle on the session's isolated Airflow."""

    def __init__(self, home: Path | None) -> None:
        self.home = home

    @staticmethod
    def set_connection(conn_id: str, **fields: Any) -> None:
        from airflow_provider_fable.testing.airflow_env import set_connection

        set_connection(conn_id, **fields)

    @staticmethod
    def load_dag(
        dag_id: str, dags_folder: str | os.PathLike[str] | None = None, *, serialize: bool = False
    ) -> Any:
        """Parse and return one DAG; ``serialize=True`` also registers the folder for ``dag.test()``."""
        from airflow_provider_fable.testing.airflow_env import load_dag

        return load_dag(dag_id, dags_folder, serialize=serialize)

    @staticmethod
    def run_dag(dag: Any, **kwargs: Any) -> Any:
        from airflow_provider_fable.testing.airflow_env import run_dag

        return run_dag(dag, **kwargs)


def pytest_unconfigure(config: pytest.Config) -> None:
    home = getattr(config, "_fable_airflow_home", None)
    if home is not None:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def fable_airflow(request: pytest.FixtureRequest) -> FableAirflow:
    from airflow_provider_fable.testing.airflow_env import ensure_metadata_db

    home = getattr(request.config, "_fable_airflow_home", None)
    if home is None or os.environ.get("AIRFLOW_HOME") != str(Path(home).resolve()):
        pytest.fail(
            "fable_airflow creates tables and DAG runs in the Airflow metadata DB, so it only runs on "
            "the plugin's private Airflow: set `fable_isolate_airflow = true` in your pytest ini "
            "(or FABLE_ISOLATE_AIRFLOW=1) and make sure nothing imports airflow before pytest starts",
            pytrace=False,
        )
    ensure_metadata_db()
    return FableAirflow(home)


@pytest.fixture(scope="session")
def fable_emulator() -> Iterator[Any]:
    from airflow_provider_fable.emulator import EmulatorServer

    with EmulatorServer() as server:
        yield server


@pytest.fixture
def fable_emulator_factory() -> Iterator[Callable[..., Any]]:
    """``factory(processing_seconds=2, faults={"invalid_answer_rate": 0.2})`` -> running server."""
    from airflow_provider_fable.emulator import EmulatorServer, EmulatorSettings, FaultSettings

    servers: list[Any] = []

    def start(*, faults: dict[str, Any] | None = None, **settings: Any) -> Any:
        cfg = EmulatorSettings(**settings, faults=FaultSettings(**(faults or {})))
        server = EmulatorServer(cfg).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def point_connection_at(server: Any, conn_id: str = "fable_default", **extra: Any) -> None:
    """Make ``conn_id`` a ``fable`` connection to ``server`` with the test key."""
    from airflow_provider_fable.testing.airflow_env import set_connection

    set_connection(
        conn_id, conn_type="fable", host=server.base_url, password=TEST_API_KEY, extra=extra or None
    )


@pytest.fixture
def fable_connection(fable_emulator: Any) -> Iterator[Any]:
    """``fable_default`` -> the session emulator, removed again after the test."""
    name = "AIRFLOW_CONN_FABLE_DEFAULT"
    before = os.environ.get(name)
    point_connection_at(fable_emulator)
    yield fable_emulator
    if before is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = before

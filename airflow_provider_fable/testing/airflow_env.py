"""An isolated Airflow for tests and the demo, and a DAG runner that reports what happened.

Airflow reads AIRFLOW_HOME and its config when ``airflow`` is first imported, so
:func:`isolate_airflow` must run before that import; it refuses (rather than silently doing
nothing) when Airflow is already loaded with another home.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_DB_READY: set[str] = set()


def isolate_airflow(
    home: str | os.PathLike[str], *, dags_folder: str | os.PathLike[str] | None = None
) -> Path:
    """Point Airflow at a private home with a SQLite metadata DB and no example DAGs."""
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    if "airflow" in sys.modules and os.environ.get("AIRFLOW_HOME") != str(home):
        raise RuntimeError(
            "airflow is already imported with another AIRFLOW_HOME; call isolate_airflow() before "
            "importing airflow (the pytest plugin does this in pytest_configure)"
        )
    env = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": os.environ.get("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO"),
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
    }
    key_file = home / "fernet.key"
    if not key_file.exists():
        from cryptography.fernet import Fernet

        key_file.write_bytes(Fernet.generate_key())
    env["AIRFLOW__CORE__FERNET_KEY"] = key_file.read_text().strip()
    # The in-process Execution API that dag.test() talks to signs task tokens with this secret.
    # Airflow 3.3 makes one when missing; 3.2's lifespan fails without it (the task then dies on
    # "'State' object has no attribute 'svcs_registry'"). A deployment sets it in airflow.cfg.
    if not os.environ.get("AIRFLOW__API_AUTH__JWT_SECRET"):
        secret_file = home / "jwt_secret"
        if not secret_file.exists():
            import secrets

            secret_file.write_text(secrets.token_urlsafe(32))
        env["AIRFLOW__API_AUTH__JWT_SECRET"] = secret_file.read_text().strip()
    if dags_folder is not None:
        env["AIRFLOW__CORE__DAGS_FOLDER"] = str(Path(dags_folder).resolve())
    os.environ.update(env)
    return home


def ensure_metadata_db() -> None:
    """Create the metadata DB schema once per process (idempotent, fast when already there)."""
    url = os.environ.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "")
    if url in _DB_READY:
        return
    from airflow.utils.db import initdb

    initdb()
    _await_execution_api_lifespan()
    _DB_READY.add(url)


def _await_execution_api_lifespan() -> None:
    """Airflow 3.2 only: give ``dag.test()``'s in-process Execution API its services registry.

    3.2's app registers its services (JWT generator/validator) in its lifespan, which the
    in-process transport runs late or, through ``atransport``, never: a task's first request
    then dies with "'State' object has no attribute 'svcs_registry'". Airflow 3.3 starts the
    lifespan before serving; a real api-server runs it. Here the app gets, when it is created,
    the registry the lifespan would build (the lifespan, when it runs, replaces it).
    """
    from airflow_provider_fable._compat import AIRFLOW_VERSION

    if AIRFLOW_VERSION != (3, 2):
        return
    import svcs
    from airflow.api_fastapi.execution_api import app as execution_app

    api_class = execution_app.InProcessExecutionAPI
    # A slotted attrs class: its cached properties (``app``) are computed by the class's
    # __getattr__ on first access, so the registry is added there.
    original: Any = getattr(api_class, "__getattr__")  # noqa: B009 - absent from the type stubs
    if getattr(original, "_fable_registry", False):
        return

    def getattr_with_registry(self: Any, name: str) -> Any:
        value = original(self, name)
        if name == "app" and "svcs_registry" not in value.state._state:
            registry = svcs.Registry()
            registry.register_factory(execution_app.JWTGenerator, execution_app._jwt_generator)
            validator = execution_app._jwt_validator()
            registry.register_value(
                execution_app.JWTValidator, validator, ping=execution_app.JWTValidator.status
            )
            value.state.svcs_registry = registry
        return value

    getattr_with_registry._fable_registry = True  # type: ignore[attr-defined]
    setattr(api_class, "__getattr__", getattr_with_registry)  # noqa: B010 - as above


def set_connection(conn_id: str, **fields: Any) -> str:
    """Define a connection through the environment (``AIRFLOW_CONN_<ID>``, JSON form)."""
    name = f"AIRFLOW_CONN_{conn_id.upper()}"
    os.environ[name] = json.dumps({k: v for k, v in fields.items() if v is not None})
    return name


@dataclass
class DagRunResult:
    """What a test wants to know after a DAG run."""

    dag_id: str
    run_id: str
    state: str
    task_states: dict[str, str | None]
    xcoms: dict[str, Any] = field(default_factory=dict)

    def xcom(self, task_id: str) -> Any:
        """The return value of ``task_id`` (None when it returned nothing)."""
        return self.xcoms.get(task_id)


def _state(value: Any) -> str | None:
    """States come back as enums or plain strings depending on the code path; normalise."""
    return None if value is None else str(getattr(value, "value", value))


def load_dag(
    dag_id: str, dags_folder: str | os.PathLike[str] | None = None, *, serialize: bool = False
) -> Any:
    """Parse the DAGs folder and return one DAG, with import errors spelled out.

    ``serialize=True`` also writes the folder's DAGs into the metadata DB under the
    ``dags-folder`` bundle: ``dag.test()`` syncs only the configured bundles, so a DAG parsed
    from any other folder must be serialized first (on every supported Airflow minor).
    """
    from airflow_provider_fable._compat import dagbag_class, sync_bag_to_db

    DagBag = dagbag_class()

    ensure_metadata_db()
    folder = str(dags_folder or os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
    bag = DagBag(dag_folder=folder)
    if bag.import_errors:
        raise RuntimeError(f"DAG import errors: {bag.import_errors}")
    if serialize:
        from airflow.dag_processing.bundles.manager import DagBundlesManager

        DagBundlesManager().sync_bundles_to_db()
        sync_bag_to_db(bag, "dags-folder", None)
    dag = bag.get_dag(dag_id)
    if dag is None:
        raise KeyError(f"no DAG {dag_id!r} in {folder} (found: {sorted(bag.dag_ids)})")
    return dag


def run_dag(dag: Any, *, conf: dict[str, Any] | None = None, logical_date: Any = None) -> DagRunResult:
    """Run ``dag`` once with ``dag.test()`` (triggers run inline) and collect states and XComs."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    ensure_metadata_db()
    kwargs: dict[str, Any] = {"run_conf": conf}
    if logical_date is not None:
        kwargs["logical_date"] = logical_date
    dr = dag.test(**kwargs)
    with create_session() as session:
        tis = dr.get_task_instances(session=session)
        states = {ti.task_id: _state(ti.state) for ti in tis}
        rows = session.query(XComModel).filter(
            XComModel.dag_id == dag.dag_id, XComModel.run_id == dr.run_id, XComModel.key == "return_value"
        )
        xcoms = {row.task_id: XComModel.deserialize_value(row) for row in rows}
    return DagRunResult(
        dag_id=dag.dag_id, run_id=dr.run_id, state=_state(dr.state) or "none", task_states=states, xcoms=xcoms
    )

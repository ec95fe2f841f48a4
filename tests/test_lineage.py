"""Lineage: the load's tables as Assets (URIs from the connection) and OpenLineage facets.

A small DAG (SQL source on SQLite, destination on a private PostgreSQL database) runs through real
Airflow (dag.test) against the emulator; the Asset events Airflow recorded and the facets the
OpenLineage provider's own extractor manager gets from the operators are checked. That a DAG
scheduled on the Asset really runs after a load is checked with a real scheduler in
``tests/test_ui_deployment.py``.
"""

from __future__ import annotations

import json
import textwrap
from types import SimpleNamespace

import pytest
import sqlalchemy as sa

from airflow_provider_fable.core.lineage import table_name
from airflow_provider_fable.testing.plugin import point_connection_at

DAG_FILE = """
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from airflow.sdk import DAG
from airflow_provider_fable.operators.load import FableValidateLoadOperator
from airflow_provider_fable.operators.submit import FableBatchSubmitOperator


class Paint(BaseModel):
    model_config = ConfigDict(extra="forbid")
    color: str
    glossy: bool
    coats: int = Field(ge=1, le=5)
    note: str = Field(max_length=80)


with DAG(dag_id="lineage_paint", schedule=None, catchup=False) as dag:
    submit = FableBatchSubmitOperator(
        task_id="submit",
        prompt_template="Paint for {id}: {text}",
        output_model=Paint,
        sql="SELECT p.id, p.text FROM paint_src p JOIN paint_pick k ON k.id = p.id",
        sql_conn_id="src_db",
        destination_conn_id="lineage_dest",
        destination_table="paint",
        destination_id_column="paint_id",
    )
    load = FableValidateLoadOperator(
        task_id="load",
        batch_ids=submit.output,
        output_model=Paint,
        destination_conn_id="lineage_dest",
        table="paint",
        id_column="paint_id",
    )
    submit >> load
"""


def test_table_names_follow_the_registered_schemes():
    from airflow.sdk import Asset

    pg = table_name("postgres", host="db.example", port=None, database="warehouse", table="paint")
    assert pg.uri == "postgres://db.example:5432/warehouse/public/paint"
    assert (pg.namespace, pg.name) == ("postgres://db.example:5432", "warehouse.public.paint")
    assert table_name("postgres", host="h", port=6543, database="d", table="crm.leads").uri == (
        "postgres://h:6543/d/crm/leads"
    )
    lite = table_name("sqlite", host="/data/backlog.db", table="paint")
    assert lite.uri == "sqlite://localhost/data/backlog.db/paint"
    # Airflow accepts both, unchanged by its normalisation (the postgres provider's sanitize_uri).
    for uri in (pg.uri, lite.uri):
        assert Asset(uri=uri).uri == uri


def test_the_load_declares_an_alias_without_reading_a_connection():
    """At parse time the operator names its table; no connection exists here and none is read."""
    from airflow.sdk import AssetAlias

    from airflow_provider_fable.operators.load import FableValidateLoadOperator

    op = FableValidateLoadOperator(
        task_id="load", batch_ids=[], output_model="tests.conftest.Paint", destination_conn_id="nowhere",
        table="paint",
    )  # fmt: skip
    assert op.outlets == [AssetAlias(name="fable-table:nowhere/paint")]
    templated = FableValidateLoadOperator(
        task_id="load2", batch_ids=[], output_model="tests.conftest.Paint", destination_conn_id="nowhere",
        table="paint_{{ ds_nodash }}",
    )  # fmt: skip
    assert templated.outlets == []
    given = FableValidateLoadOperator(
        task_id="load3", batch_ids=[], output_model="tests.conftest.Paint", destination_conn_id="nowhere",
        table="paint", outlets=[AssetAlias(name="mine")],
    )  # fmt: skip
    assert given.outlets == [AssetAlias(name="mine")]


@pytest.fixture
def lineage_env(fable_airflow, fable_emulator, tmp_path, monkeypatch):
    from tests.conftest import private_pg_database

    point_connection_at(fable_emulator, ledger_conn_id="lineage_ledger")
    src = tmp_path / "src.db"
    engine = sa.create_engine(f"sqlite:///{src}")
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE paint_src (id TEXT PRIMARY KEY, text TEXT)"))
        conn.execute(sa.text("CREATE TABLE paint_pick (id TEXT PRIMARY KEY)"))
        for i in range(12):
            conn.execute(
                sa.text("INSERT INTO paint_src VALUES (:i, :t)"), {"i": f"p{i}", "t": f"red fence {i}"}
            )
            conn.execute(sa.text("INSERT INTO paint_pick VALUES (:i)"), {"i": f"p{i}"})
    engine.dispose()
    fable_airflow.set_connection("src_db", conn_type="sqlite", host=str(src))
    fable_airflow.set_connection("lineage_ledger", conn_type="sqlite", host=str(tmp_path / "ledger.db"))
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "lineage_paint.py").write_text(textwrap.dedent(DAG_FILE))
    with private_pg_database("fable_lineage") as url:
        conn = {"conn_type": "postgres", "host": url.host, "port": url.port or 5432, "login": url.username,
                "schema": url.database}  # fmt: skip
        monkeypatch.setenv("AIRFLOW_CONN_LINEAGE_DEST", json.dumps(conn))
        yield SimpleNamespace(airflow=fable_airflow, dags=dags, url=url, src=src)
    monkeypatch.delenv("AIRFLOW_CONN_FABLE_DEFAULT", raising=False)


def test_load_emits_table_assets_and_openlineage_facets(lineage_env):
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.providers.openlineage.extractors.manager import ExtractorManager
    from airflow.utils.session import create_session
    from airflow.utils.state import TaskInstanceState

    env = lineage_env
    dag = env.airflow.load_dag("lineage_paint", env.dags, serialize=True)  # dag.test() syncs only its folder
    result = env.airflow.run_dag(dag)
    assert result.state == "success", result.task_states

    netloc = f"{env.url.host}:{env.url.port or 5432}"
    dest_uri = f"postgres://{netloc}/{env.url.database}/public/paint"
    rejects_uri = f"postgres://{netloc}/{env.url.database}/public/paint_rejects"
    with create_session() as session:
        events = (
            session.query(AssetModel.uri, AssetEvent.extra)
            .join(AssetEvent, AssetEvent.asset_id == AssetModel.id)
            .filter(AssetEvent.source_dag_id == "lineage_paint", AssetEvent.source_run_id == result.run_id)
            .all()
        )
    by_uri = {uri: extra for uri, extra in events}
    assert set(by_uri) == {dest_uri, rejects_uri}
    assert by_uri[dest_uri]["accepted"] == result.xcom("load")["accepted"]

    from airflow_provider_fable.lineage import fable_asset

    assert fable_asset("lineage_dest", "paint").uri == dest_uri  # what a downstream DAG schedules on

    manager = ExtractorManager()
    dagrun = SimpleNamespace(run_id=result.run_id)
    load = manager.extract_metadata(dagrun, dag.get_task("load"), TaskInstanceState.SUCCESS, None)
    outputs = {(d.namespace, d.name): d for d in load.outputs}
    ns = f"postgres://{netloc}"
    assert set(outputs) == {
        (ns, f"{env.url.database}.public.paint"),
        (ns, f"{env.url.database}.public.paint_rejects"),
    }
    fields = [f.name for f in outputs[(ns, f"{env.url.database}.public.paint")].facets["schema"].fields]
    dest = sa.create_engine(env.url)
    try:
        real = [c["name"] for c in sa.inspect(dest).get_columns("paint")]
        real_rejects = [c["name"] for c in sa.inspect(dest).get_columns("paint_rejects")]
    finally:
        dest.dispose()
    assert fields == real  # the facet's schema is the table the load created
    rej_fields = [
        f.name for f in outputs[(ns, f"{env.url.database}.public.paint_rejects")].facets["schema"].fields
    ]
    assert rej_fields == real_rejects

    submit = manager.extract_metadata(dagrun, dag.get_task("submit"), TaskInstanceState.SUCCESS, None)
    assert {(d.namespace, d.name) for d in submit.inputs} == {
        (f"sqlite://localhost{env.src}", "paint_src"),
        (f"sqlite://localhost{env.src}", "paint_pick"),
    }
    assert [(d.namespace, d.name) for d in submit.outputs] == [(ns, f"{env.url.database}.public.paint")]

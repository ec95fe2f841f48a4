"""Regression tests of issue #6: no bad input lands silently, no bad answer blocks a load.

Each test names the item it pins down. They run the real operators and hook against the
emulator over HTTP, with real SQLite and (where the destination matters) real PostgreSQL.
"""

from __future__ import annotations

import json
import math
import socket
import tracemalloc
import urllib.request

import pandas as pd
import pytest
import sqlalchemy as sa
from pydantic import BaseModel, Field

from airflow_provider_fable.core.errors import FableError, JobSpecError, RecordError
from airflow_provider_fable.core.job import BatchJob
from airflow_provider_fable.core.preflight import PreflightError, check_destination
from airflow_provider_fable.core.requests import build_requests
from airflow_provider_fable.core.sinks import model_properties
from airflow_provider_fable.core.spool import iter_body, read_requests, spool_requests
from airflow_provider_fable.hooks.fable import BatchCreateUncertainError, FableApiError, FableHook
from airflow_provider_fable.operators.submit import FableBatchSubmitOperator
from airflow_provider_fable.testing.airflow_env import set_connection
from airflow_provider_fable.testing.plugin import TEST_API_KEY, point_connection_at
from tests.conftest import Paint

RECORDS = [{"id": f"h{i}", "text": f"{['red', 'green', 'blue'][i % 3]} door, two coats"} for i in range(5)]


class Node(BaseModel):
    """A self-referencing output model: pydantic puts its top level behind a ``$ref``."""

    name: str = Field(max_length=40)
    children: list[Node] = Field(default_factory=list, max_length=3)


def creates(server) -> int:
    with urllib.request.urlopen(f"{server.base_url}/_emulator/stats") as resp:
        return json.load(resp)["calls"]["create"]


def submit_op(**kwargs) -> FableBatchSubmitOperator:
    spec = dict(
        task_id="submit", prompt_template="Paint for {id}: {text}", output_model=Paint, records=RECORDS
    )
    spec.update(kwargs)
    return FableBatchSubmitOperator(**spec)


@pytest.fixture
def server(fable_emulator_factory):
    server = fable_emulator_factory()
    point_connection_at(server)
    return server


@pytest.fixture
def dest(tmp_path, monkeypatch):
    db = tmp_path / "dest.db"
    monkeypatch.setenv("AIRFLOW_CONN_DEST_DB", json.dumps({"conn_type": "sqlite", "host": str(db)}))
    engine = sa.create_engine(f"sqlite:///{db}")
    yield engine
    engine.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- item 1
def test_item1_self_referencing_model_properties_are_found_behind_the_root_ref():
    schema = Node.model_json_schema(by_alias=True)
    assert "$ref" in schema and "properties" not in schema  # the shape that hid every field
    properties, defs = model_properties(Node)
    assert list(properties) == ["name", "children"]
    assert "Node" in defs
    check_destination(table="nodes", id_column="id", output_model=Node)  # storable: no error


def test_item1_self_referencing_model_is_refused_before_paying(server):
    # The API refuses a recursive structured-output schema: every request would end errored after
    # the wait. (The emulator mirrors that rule; before, answers "loaded" into id-only rows.)
    with pytest.raises(JobSpecError, match=r"output_model Node is recursive \(Node -> Node\)"):
        submit_op(prompt_template="Tree for {id}: {text}", output_model=Node).execute({})
    assert creates(server) == 0


# ----------------------------------------------------------------------------- item 3
@pytest.mark.parametrize("bad", [None, math.nan, float("nan")], ids=["none", "nan", "nan2"])
def test_item3_missing_template_field_fails_before_paying(server, bad):
    records = [*RECORDS, {"id": "empty1", "text": bad}]
    with pytest.raises(RecordError, match=r"'empty1' \(#6 in the source\).*missing_field.*\{text\}") as info:
        submit_op(records=records).execute({})
    assert info.value.rule == "template.missing_field"
    assert creates(server) == 0


def test_item3_dataframe_nan_and_absent_key_are_missing_too(server):
    df = pd.DataFrame([*RECORDS, {"id": "nan1", "text": float("nan")}])
    with pytest.raises(RecordError, match="'nan1'"):
        submit_op(records=df).execute({})
    with pytest.raises(RecordError, match=r"'nokey'.*has no such field"):
        submit_op(records=[*RECORDS, {"id": "nokey"}]).execute({})
    assert creates(server) == 0


def test_item3_skip_reports_and_empty_renders(server):
    records = [*RECORDS, {"id": "gap1", "text": None}, {"id": "gap2", "text": math.nan}]
    manifest = submit_op(records=records, on_missing_field="skip").execute({})
    assert manifest["request_count"] == len(RECORDS)
    assert manifest["missing_field_skipped"]["count"] == 2
    assert [
        (s["record_id"], s["position"], s["fields"]) for s in manifest["missing_field_skipped"]["records"]
    ] == [
        ("gap1", 6, ["text"]),
        ("gap2", 7, ["text"]),
    ]
    job = BatchJob(prompt_template="Paint for {id}: {text}", output_model=Paint, on_missing_field="empty")
    (request,) = build_requests(job, [{"id": "gap", "text": math.nan}])
    assert request["params"]["messages"][-1]["content"] == "Paint for gap: "


# ----------------------------------------------------------------------------- item 4
def test_item4_lone_surrogate_is_a_record_error_with_id_and_position(server, tmp_path):
    path = tmp_path / "records.jsonl"
    lines = [json.dumps(r) for r in RECORDS] + ['{"id": "sur1", "text": "broken \\ud83d emoji"}']
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordError, match=r"'sur1' \(#6 in the source\).*text.unencodable.*'text'") as info:
        submit_op(records=str(path)).execute({})
    assert "\\ud83d" in str(info.value)
    assert creates(server) == 0


def test_item4_lone_surrogate_in_the_system_prompt_is_a_spec_error():
    with pytest.raises(JobSpecError, match=r"system_prompt has \\ud800 at character 5"):
        BatchJob(prompt_template="{id}", output_model=Paint, system_prompt="Pick \ud800 paint.")


# ----------------------------------------------------------------------------- item 6
def test_item6_jsonl_line_that_is_not_an_object_names_file_and_line(server, tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n" + '["h9", "not an object"]\n')
    with pytest.raises(ValueError, match=r"records\.jsonl:3: not a JSON object \(found a JSON array\)"):
        submit_op(records=str(path)).execute({})
    assert creates(server) == 0


def test_item6_csv_with_byte_order_mark_keeps_its_first_column(server, tmp_path):
    path = tmp_path / "excel.csv"
    body = "id,text\n" + "".join(f"{r['id']},{r['text']}\n" for r in RECORDS)
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    manifest = submit_op(records=str(path)).execute({})
    assert manifest["request_count"] == len(RECORDS)


def test_item6_jsonl_with_bom_loads_and_bad_bytes_name_file_and_line(server, tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in RECORDS).encode() + b"\n")
    assert submit_op(records=str(path)).execute({})["request_count"] == len(RECORDS)
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(json.dumps(RECORDS[0]).encode() + b'\n{"id": "x", "text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl:2: not UTF-8"):
        submit_op(records=str(bad)).execute({})
    csv_bad = tmp_path / "latin1.csv"
    csv_bad.write_bytes(b"id,text\nx,caf\xe9\n")
    with pytest.raises(ValueError, match=r"latin1\.csv: not UTF-8"):
        submit_op(records=str(csv_bad)).execute({})
    assert creates(server) == 1


# ----------------------------------------------------------------------------- item 7
def test_item7_missing_or_non_sql_destination_fails_before_the_first_create(server):
    with pytest.raises(PreflightError, match="destination connection 'nowhere' does not exist"):
        submit_op(destination_conn_id="nowhere", destination_table="paint").execute({})
    set_connection("not_sql", conn_type="fable", host=server.base_url, password=TEST_API_KEY)
    with pytest.raises(PreflightError, match="'not_sql' is not a SQL connection"):
        submit_op(destination_conn_id="not_sql", destination_table="paint").execute({})
    assert creates(server) == 0


def test_item7_bad_names_and_unstorable_model_fail_before_the_first_create(server, dest):
    class Dashed(BaseModel):
        ok: str
        bad_field: str = Field(alias="bad-field")

    with pytest.raises(PreflightError) as info:
        submit_op(
            destination_conn_id="dest_db",
            destination_table="public.paint",
            destination_id_column="paint id",
            output_model=Dashed,
        ).execute({})
    text = str(info.value)
    assert "nothing was paid for" in text
    assert "table 'public.paint'" in text and "id column 'paint id'" in text
    assert "field 'bad-field'" in text
    assert creates(server) == 0
    manifest = submit_op(destination_conn_id="dest_db", destination_table="paint").execute({})
    assert manifest["request_count"] == len(RECORDS) and creates(server) == 1


@pytest.mark.parametrize("engine_name", ["sqlite_engine", "pg_engine"])
def test_item7_existing_table_without_the_model_columns_is_refused(engine_name, request):
    engine = request.getfixturevalue(engine_name)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE paint (id TEXT PRIMARY KEY, color TEXT)"))
    check_destination(table="fresh", id_column="id", output_model=Paint, engine=engine)
    with pytest.raises(PreflightError, match=r"table 'paint' exists without column\(s\) glossy, coats, note"):
        check_destination(table="paint", id_column="id", output_model=Paint, engine=engine)


# ----------------------------------------------------------------------------- item 8
def test_item8_refused_connection_is_not_uncertain_and_names_no_billed_batches(monkeypatch):
    port = free_port()
    set_connection(
        "fable_default",
        conn_type="fable",
        host=f"http://127.0.0.1:{port}",
        password=TEST_API_KEY,
        extra={"max_retries": 1},
    )
    with pytest.raises(FableError) as info:
        submit_op().execute({})
    text = str(info.value)
    assert not isinstance(info.value.__cause__, BatchCreateUncertainError)
    assert isinstance(info.value.__cause__, FableApiError)
    assert "never sent" in text and f"127.0.0.1:{port}" in text
    assert "may or may not" not in text and "running and billed" not in text
    assert "before this task had created any batch" in text


def test_item8_create_404_blames_a_base_url_ending_in_v1(server):
    set_connection("fable_v1", conn_type="fable", host=f"{server.base_url}/v1", password=TEST_API_KEY)
    hook = FableHook("fable_v1")
    with pytest.raises(FableApiError, match=r"HTTP 404.*ends in /v1") as info:
        hook.create_batch(list(build_requests(BatchJob(prompt_template="{id}", output_model=Paint), RECORDS)))
    assert "batch id is unknown" not in str(info.value)


def test_item8_create_404_on_a_wrong_path_is_not_an_unknown_batch(server):
    set_connection("fable_path", conn_type="fable", host=f"{server.base_url}/api", password=TEST_API_KEY)
    with pytest.raises(FableApiError, match=r"HTTP 404.*no such endpoint.*base URL") as info:
        FableHook("fable_path").create_batch(
            list(build_requests(BatchJob(prompt_template="{id}", output_model=Paint), RECORDS))
        )
    assert "batch id is unknown" not in str(info.value)


# ----------------------------------------------------------------------------- item 11 (scheme)
def test_item11_uri_connection_with_explicit_http_scheme(server, monkeypatch):
    host, port = server.base_url.split("://", 1)[1].split(":")
    monkeypatch.setenv("AIRFLOW_CONN_FABLE_URI", f"fable://:{TEST_API_KEY}@{host}:{port}?scheme=http")
    hook = FableHook("fable_uri")
    assert hook.base_url == f"http://{host}:{port}"
    batch = hook.create_batch(
        list(build_requests(BatchJob(prompt_template="{id}", output_model=Paint), RECORDS))
    )
    assert hook.retrieve_batch(batch.id).id == batch.id
    monkeypatch.setenv("AIRFLOW_CONN_FABLE_NOSCHEME", f"fable://:{TEST_API_KEY}@{host}:{port}?max_retries=0")
    with pytest.raises(FableApiError, match=r"https was assumed.*scheme=http"):
        FableHook("fable_noscheme").retrieve_batch(batch.id)


# ----------------------------------------------------------------------------- item 12
def test_item12_spooled_body_is_the_exact_create_body_streamed_in_bounded_chunks(tmp_path):
    job = BatchJob(prompt_template="Paint for {id}: {text}", output_model=Paint, system_prompt="Pick paint.")
    records = [{"id": f"m{i}", "text": "a long and winding description " * 8} for i in range(20_000)]
    with open(tmp_path / "spool", "w+b") as spool:
        shards = spool_requests(build_requests(job, records), spool, max_requests=15_000)
        assert [s.count for s in shards] == [15_000, 5_000]
        expected = json.dumps(
            {"requests": read_requests(spool, shards[0])}, ensure_ascii=False, separators=(",", ":")
        )
        body = b"".join(iter_body(spool, shards[0]))
        assert body == expected.encode() and len(body) == shards[0].body_bytes
        tracemalloc.start()
        try:
            streamed = sum(len(chunk) for chunk in iter_body(spool, shards[0], chunk_bytes=1 << 20))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert streamed == len(body) > 10 * (1 << 20)
    assert peak < 4 * (1 << 20), f"streaming a {len(body) >> 20} MB body held {peak >> 20} MB"


def test_item12_submit_streams_shards_through_the_hook(server):
    manifest = submit_op(max_requests_per_batch=2).execute({})
    assert [s["requests"] for s in manifest["shards"]] == [2, 2, 1]
    hook = FableHook()
    got = sorted(r.custom_id for b in manifest["batch_ids"] for r in hook.iter_results(b))
    assert got == sorted(r["id"] for r in RECORDS)

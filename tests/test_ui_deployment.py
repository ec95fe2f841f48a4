"""The Backlogs page and Asset scheduling on a real Airflow deployment, driven by headless Chromium.

Services (api-server with the simple auth manager, scheduler with the LocalExecutor,
dag-processor) run as subprocesses on a private PostgreSQL metadata database, as in
``tests/test_real_retry.py``. A backlog of 80 records runs through the emulator (some answers
invalid, some errored) with its ledger and destination on private PostgreSQL databases; a second
DAG is scheduled on the destination table's Asset (``fable_asset``) and must run after the load.

Then: every route of the plugin refuses anonymous requests (401/403); Debian's Chromium (Selenium,
chromedriver) logs in through Airflow's own login form, opens the Backlogs page inside Airflow's
UI and on its own, and a job page; counts, cost and the top reject reason it shows are checked
against the ledger's tables; screenshots go to ``docs/img/``. A viewer may read the pages but not
start a rerun (Airflow's permission check); an admin starts one and the DAG run carries
``mode=failed``.
"""

from __future__ import annotations

import json
import shutil
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import sqlalchemy as sa

from airflow_provider_fable.testing.plugin import TEST_API_KEY
from tests.conftest import private_pg_database
from tests.realdeploy import Deployment
from tests.realdeploy import poll as _poll

ROOT = Path(__file__).resolve().parents[1]
IMG = ROOT / "docs" / "img"
TIMEOUT = 420.0
PASSWORDS = {"admin": "admin-pw-1", "viewer": "viewer-pw-1"}

DAG_FILE = '''
"""A small backlog (records in the DAG) and a DAG scheduled on the table its load writes."""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field

from airflow.sdk import DAG, Param, task
from airflow_provider_fable.lineage import fable_asset
from airflow_provider_fable.operators.load import FableValidateLoadOperator
from airflow_provider_fable.operators.submit import FableBatchSubmitOperator

COLORS = ["red", "green", "blue", "white"]
RECORDS = [{"id": f"p{i:03d}", "text": f"{COLORS[i % 4]} fence, {i % 5 + 1} coats"} for i in range(80)]


class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"
    white = "white"


class Paint(BaseModel):
    model_config = ConfigDict(extra="forbid")
    color: Color
    glossy: bool
    coats: int = Field(ge=1, le=5)
    note: str = Field(max_length=80)


with DAG(
    dag_id="ui_backlog",
    schedule=None,
    catchup=False,
    params={"mode": Param("auto", enum=["auto", "failed"])},
) as dag:
    submit = FableBatchSubmitOperator(
        task_id="submit",
        prompt_template="Paint for {id}: {text}",
        output_model=Paint,
        records=RECORDS,
        max_requests_per_batch=40,
        rerun="{{ 'failed' if params.mode == 'failed' else '' }}",
    )
    load = FableValidateLoadOperator(
        task_id="load",
        batch_ids=submit.output,
        output_model=Paint,
        destination_conn_id="ui_dest",
        table="paint",
        id_column="paint_id",
        submit_manifest=submit.output,
        qa_size=10,
        fail_when_all_rejected=False,
    )
    submit >> load

with DAG(dag_id="ui_downstream", schedule=[fable_asset("ui_dest", "paint")], catchup=False):

    @task
    def count_rows(**context):
        events = context["triggering_asset_events"]
        return sum(len(v) for v in events.values())

    count_rows()
'''


def _url_conn(url) -> dict:
    return {"conn_type": "postgres", "host": url.host, "port": url.port or 5432, "login": url.username,
            "schema": url.database}  # fmt: skip


@pytest.fixture(scope="module")
def ui_deployment(tmp_path_factory) -> Iterator[SimpleNamespace]:
    from airflow_provider_fable.emulator import EmulatorServer, EmulatorSettings, FaultSettings

    root = tmp_path_factory.mktemp("ui-deploy")
    with (
        private_pg_database("fable_ui_meta") as meta_url,
        private_pg_database("fable_ui_ledger") as ledger_url,
        private_pg_database("fable_ui_dest") as dest_url,
    ):
        dep = Deployment(root, meta_url.render_as_string(hide_password=False))
        (root / "passwords.json").write_text(json.dumps(PASSWORDS))
        dep.env.update(
            {
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(root / "passwords.json"),
            }
        )
        server = EmulatorServer(
            EmulatorSettings(faults=FaultSettings(invalid_answer_rate=0.2, errored_rate=0.05, seed=11))
        ).start()
        try:
            dep.connection("fable_default", conn_type="fable", host=server.base_url, password=TEST_API_KEY,
                           extra=json.dumps({"ledger_conn_id": "fable_ledger"}))  # fmt: skip
            dep.connection("fable_ledger", **_url_conn(ledger_url))
            dep.connection("ui_dest", **_url_conn(dest_url))
            (dep.dags / "ui_dags.py").write_text(textwrap.dedent(DAG_FILE))
            dep.cli("db", "migrate")
            dep.start("api-server", "api-server", "--workers", "1")
            dep.start("scheduler", "scheduler")
            dep.start("dag-processor", "dag-processor")
            engine = sa.create_engine(meta_url)
            ledger = sa.create_engine(ledger_url)
            try:
                ns = SimpleNamespace(dep=dep, engine=engine, ledger=ledger, root=root, dest_url=dest_url)
                _run_backlog(ns)
                yield ns
            finally:
                engine.dispose()
                ledger.dispose()
        finally:
            dep.stop()
            server.stop()
            shutil.rmtree(root, ignore_errors=True)


def _token(dep: Deployment, user: str) -> str:
    req = urllib.request.Request(
        f"http://127.0.0.1:{dep.port}/auth/token",
        data=json.dumps({"username": user, "password": PASSWORDS[user]}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)["access_token"]


def _run_backlog(ns: SimpleNamespace) -> None:
    dep, engine = ns.dep, ns.engine

    def parsed() -> bool:
        with engine.connect() as conn:
            return {"ui_backlog", "ui_downstream"} <= set(
                conn.execute(sa.text("SELECT dag_id FROM serialized_dag")).scalars()
            )

    _poll("the dag-processor to serialize the DAGs", dep, parsed, TIMEOUT)

    def answering() -> str | None:
        try:
            return _token(dep, "admin")
        except OSError:
            return None

    token = _poll("the api-server to answer", dep, answering, TIMEOUT)
    dep.api(
        "POST", "/api/v2/dags/ui_backlog/dagRuns", token, {"dag_run_id": "ui_first", "logical_date": None}
    )

    def state(dag_id: str, run_id: str | None = None) -> str | None:
        q = "SELECT state FROM dag_run WHERE dag_id = :d" + (" AND run_id = :r" if run_id else "")
        with engine.connect() as conn:
            s = conn.execute(sa.text(q), {"d": dag_id, "r": run_id}).scalars().first()
        return s if s in ("success", "failed") else None

    done = _poll("the backlog run to finish", dep, lambda: state("ui_backlog", "ui_first"), TIMEOUT)
    assert done == "success", dep.diagnostics()
    ns.downstream_state = _poll(
        "the Asset-scheduled DAG to run", dep, lambda: state("ui_downstream"), TIMEOUT
    )
    ns.admin_token = token


def _ledger_truth(ledger: sa.Engine) -> dict:
    with ledger.connect() as conn:
        (job_id,) = conn.execute(sa.text("SELECT job_id FROM fable_jobs")).scalars().all()
        counts = dict(
            conn.execute(sa.text("SELECT status, count(*) FROM fable_records GROUP BY status")).all()
        )
        top = conn.execute(
            sa.text("SELECT reason, count(*) AS n FROM fable_records WHERE status = 'rejected' "
                    "GROUP BY reason ORDER BY n DESC, reason LIMIT 1")
        ).first()  # fmt: skip
        cost = conn.execute(sa.text("SELECT sum(cost_usd) FROM fable_job_loads")).scalar_one()
    return {"job_id": job_id, "counts": counts, "top": top, "cost": cost}


def test_downstream_dag_scheduled_on_the_destination_asset_runs_after_the_load(ui_deployment):
    ns = ui_deployment
    assert ns.downstream_state == "success", ns.dep.diagnostics()
    with ns.engine.connect() as conn:
        uris = set(
            conn.execute(
                sa.text("SELECT a.uri FROM asset_event e JOIN asset a ON a.id = e.asset_id "
                        "WHERE e.source_dag_id = 'ui_backlog'")
            ).scalars()
        )  # fmt: skip
    netloc = f"{ns.dest_url.host}:{ns.dest_url.port or 5432}"
    assert uris == {
        f"postgres://{netloc}/{ns.dest_url.database}/public/paint",
        f"postgres://{netloc}/{ns.dest_url.database}/public/paint_rejects",
    }


def _status(dep: Deployment, method: str, path: str, headers: dict | None = None) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{dep.port}{path}", method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_every_route_refuses_anonymous_requests(ui_deployment):
    ns = ui_deployment
    job = _ledger_truth(ns.ledger)["job_id"]
    routes = [
        ("GET", "/fable/"),
        ("GET", "/fable/api/jobs"),
        ("GET", f"/fable/dags/ui_backlog/jobs/{job}"),
        ("GET", f"/fable/api/dags/ui_backlog/jobs/{job}"),
        ("POST", f"/fable/dags/ui_backlog/jobs/{job}/rerun"),
    ]
    for method, path in routes:
        assert _status(ns.dep, method, path, {"X-Fable-Action": "rerun"}) in (401, 403), (method, path)
        bad = {"Authorization": "Bearer not-a-token", "X-Fable-Action": "rerun"}
        assert _status(ns.dep, method, path, bad) in (401, 403), (method, path)
    # The same routes answer an authenticated user (so the refusals above are about auth).
    token = _token(ns.dep, "viewer")
    assert _status(ns.dep, "GET", "/fable/", {"Authorization": f"Bearer {token}"}) == 200
    # A viewer may read but not start runs: Airflow's own DAG-run permission refuses it.
    viewer = {"Authorization": f"Bearer {token}", "X-Fable-Action": "rerun"}
    assert _status(ns.dep, "POST", f"/fable/dags/ui_backlog/jobs/{job}/rerun", viewer) == 403
    # Without the page's header an admin's POST is refused too (no cross-site form can start one).
    admin = {"Authorization": f"Bearer {ns.admin_token}"}
    assert _status(ns.dep, "POST", f"/fable/dags/ui_backlog/jobs/{job}/rerun", admin) == 403


@pytest.fixture(scope="module")
def browser():
    if not shutil.which("chromedriver") or not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.fail("Debian's chromium and chromium-driver are needed (`make test` installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ):
        opts.add_argument(arg)
    opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    driver.implicitly_wait(10)
    yield driver
    driver.quit()


def _login(driver, base: str, user: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{base}/auth/login")
    WebDriverWait(driver, 60).until(ec.presence_of_element_located((By.NAME, "username")))
    driver.find_element(By.NAME, "username").send_keys(user)
    driver.find_element(By.NAME, "password").send_keys(PASSWORDS[user])
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(driver, 60).until(lambda d: any(c["name"] == "_token" for c in d.get_cookies()))


def test_backlogs_pages_in_chromium_match_the_ledger(ui_deployment, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ns, driver = ui_deployment, browser
    base = f"http://127.0.0.1:{ns.dep.port}"
    truth = _ledger_truth(ns.ledger)
    assert truth["counts"].get("rejected") and truth["counts"].get("accepted"), truth
    _login(driver, base, "admin")
    IMG.mkdir(parents=True, exist_ok=True)

    # Inside Airflow's UI: the nav entry's route shows the page in Airflow's frame.
    driver.get(f"{base}/plugin/fable-backlogs")
    WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.TAG_NAME, "iframe"))
    time.sleep(2)  # let the frame paint before the screenshot (not an assertion)
    driver.save_screenshot(str(IMG / "backlogs-in-airflow.png"))

    driver.get(f"{base}/fable/")
    row = driver.find_element(By.CSS_SELECTOR, f"tr[data-job='{truth['job_id']}']")
    for status in ("accepted", "rejected", "submitted", "pending"):
        shown = row.find_element(By.CSS_SELECTOR, f"td[data-status='{status}']").text
        assert int(shown.replace(",", "")) == truth["counts"].get(status, 0), status
    assert row.find_element(By.CSS_SELECTOR, "td[data-cost='actual']").text == f"${truth['cost']:,.4f}"
    driver.save_screenshot(str(IMG / "backlogs-jobs.png"))

    row.find_element(By.TAG_NAME, "a").click()
    WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.ID, "count-accepted"))
    for status in ("accepted", "rejected"):
        shown = driver.find_element(By.ID, f"count-{status}").text
        assert int(shown.replace(",", "")) == truth["counts"][status], status
    assert driver.find_element(By.ID, "cost-actual").text == f"${truth['cost']:,.4f}"
    assert driver.find_element(By.ID, "top-reason").text == truth["top"][0]
    assert driver.find_elements(By.CSS_SELECTOR, "#qa tbody tr"), "QA sample shown"
    assert driver.find_elements(By.CSS_SELECTOR, "svg rect"), "charts drawn"
    driver.set_window_size(1400, 1900)
    driver.save_screenshot(str(IMG / "backlogs-job.png"))
    driver.set_window_size(1400, 1000)

    # Start a failed-records rerun from the page: a DAG run with mode=failed.
    driver.find_element(By.ID, "rerun").click()
    WebDriverWait(driver, 30).until(lambda d: "started run" in d.find_element(By.ID, "rerun-result").text)
    run_id = driver.find_element(By.ID, "rerun-result").text.split()[-1]
    with ns.engine.connect() as conn:
        conf = conn.execute(
            sa.text("SELECT conf FROM dag_run WHERE dag_id = 'ui_backlog' AND run_id = :r"), {"r": run_id}
        ).scalar_one()
    conf = conf if isinstance(conf, dict) else json.loads(conf)
    assert conf == {"mode": "failed"}

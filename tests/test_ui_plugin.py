"""The Backlogs plugin inside Airflow's own API app (in process): registration, the embedded-ledger
explanation, and auth. The full page against a real deployment is tests/test_ui_deployment.py."""

from __future__ import annotations

import json

import pytest


@pytest.fixture
def api(fable_airflow, monkeypatch):
    from fastapi.testclient import TestClient

    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "True")
    monkeypatch.setenv("AIRFLOW__CORE__AUTH_MANAGER",
                       "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager")  # fmt: skip
    from airflow.api_fastapi.app import create_app, purge_cached_app

    purge_cached_app()
    with TestClient(create_app("core"), base_url="http://testserver") as client:
        yield client
    purge_cached_app()


def test_plugin_is_registered_with_a_nav_entry(api):
    token = api.get("/auth/token").json()["access_token"]
    plugins = api.get("/api/v2/plugins", headers={"Authorization": f"Bearer {token}"}).json()["plugins"]
    (ours,) = [p for p in plugins if p["name"] == "fable_backlogs"]
    (view,) = ours["external_views"]
    assert (view["href"], view["url_route"], view["destination"]) == ("/fable/", "fable-backlogs", "nav")


def test_embedded_ledger_page_says_why_and_how(api, monkeypatch):
    # A fable connection without ledger_conn_id: the operators would use per-worker SQLite files.
    monkeypatch.setenv("AIRFLOW_CONN_FABLE_DEFAULT", json.dumps({"conn_type": "fable", "password": "k"}))
    monkeypatch.delenv("AIRFLOW__FABLE__LEDGER_CONN_ID", raising=False)
    # (all-admins mode makes every caller an admin here; refusals are checked in test_ui_deployment.py)
    token = api.get("/auth/token").json()["access_token"]
    page = api.get("/fable/", headers={"Authorization": f"Bearer {token}"})
    assert page.status_code == 200
    assert "no-shared-ledger" in page.text and "fable_ledger.db" in page.text
    assert "ledger_conn_id" in page.text  # how to configure a shared one
    assert api.get("/fable/api/jobs", headers={"Authorization": f"Bearer {token}"}).status_code == 409

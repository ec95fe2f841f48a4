"""The provider as Airflow sees it: registration, connection form, CLI listing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from airflow_provider_fable import get_provider_info

AIRFLOW = str(Path(sys.executable).with_name("airflow"))


def test_provider_info_declares_connection_form():
    info = get_provider_info()
    assert info["package-name"] == "airflow-provider-fable"
    [conn] = info["connection-types"]
    assert conn["connection-type"] == "fable"
    assert conn["ui-field-behaviour"]["relabeling"]["password"] == "API key"
    assert {"default_model", "timeout", "max_retries"} <= set(conn["conn-fields"])


def test_airflow_cli_lists_provider_and_hook(fable_airflow):
    env = {**os.environ}
    providers = subprocess.run(
        [AIRFLOW, "providers", "list"], capture_output=True, text=True, env=env, check=True
    )
    assert "airflow-provider-fable" in providers.stdout
    hooks = subprocess.run(
        [AIRFLOW, "providers", "hooks"], capture_output=True, text=True, env=env, check=True
    )
    line = next(row for row in hooks.stdout.splitlines() if row.startswith("fable "))
    assert "airflow_provider_fable.hooks.fable.FableHook" in line

"""The ``fable-emulator`` command: flags, readiness line, clean shutdown; no Airflow import."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import anthropic
import httpx
import pytest

from airflow_provider_fable.emulator import EmulatorSettings, FaultSettings
from airflow_provider_fable.emulator.__main__ import build_parser, main, settings_from_args

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def test_every_flag_maps_to_a_setting() -> None:
    args = build_parser().parse_args(
        [
            "--processing-seconds=2",
            "--cancel-seconds=0.5",
            "--max-body-bytes=1000",
            "--min-cache-tokens=10",
            "--api-key=k",
            "--seed=9",
            "--errored-rate=0.05",
            "--expired-rate=0.01",
            "--invalid-answer-rate=0.1",
            "--invalid-kinds=non_json,bad_enum",
            "--http-error-rate=0.2",
            "--http-error-codes=429,500",
            "--http-error-endpoints=create,results",
            "--http-error-first-n=3",
            "--retry-after-ms=7",
            "--retry-after-seconds=2",
            "--description-break-rate=0.1",
            "--known-models=claude-fable-5,my-model",
            "--state=/tmp/emu-state.sqlite",
            "--transient-404-after-create=2",
            "--cut-results-after=10",
            "--cut-results-times=2",
        ]
    )
    assert settings_from_args(args) == EmulatorSettings(
        processing_seconds=2,
        cancel_seconds=0.5,
        max_body_bytes=1000,
        min_cache_tokens=10,
        api_key="k",
        known_models=("claude-fable-5", "my-model"),
        state_path="/tmp/emu-state.sqlite",
        faults=FaultSettings(
            seed=9,
            errored_rate=0.05,
            expired_rate=0.01,
            invalid_answer_rate=0.1,
            invalid_kinds=("non_json", "bad_enum"),
            http_error_rate=0.2,
            http_error_codes=(429, 500),
            http_error_endpoints=("create", "results"),
            http_error_first_n=3,
            retry_after_ms=7,
            retry_after_seconds=2,
            description_break_rate=0.1,
            transient_404_after_create=2,
            cut_results_after=10,
            cut_results_times=2,
        ),
    )


def test_defaults_match_the_settings_defaults() -> None:
    assert settings_from_args(build_parser().parse_args([])) == EmulatorSettings()


def test_star_accepts_any_model() -> None:
    assert settings_from_args(build_parser().parse_args(["--known-models", "*"])).known_models is None


@pytest.mark.parametrize(
    "argv", [["--errored-rate", "2"], ["--http-error-endpoints", "nope"], ["--invalid-kinds", "odd"]]
)
def test_invalid_settings_exit_with_usage_error(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2


def test_cli_serves_until_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "airflow_provider_fable.emulator", "--port", "0", "--api-key", "k"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=_env(),
    )
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()  # type: ignore[union-attr]
    try:
        line = lines.get(timeout=20)
        assert line.startswith("fable-emulator listening on http://127.0.0.1:")
        base_url = line.split(" on ", 1)[1].strip()
        assert httpx.get(f"{base_url}/_emulator/health").json() == {"status": "ok"}
        sdk = anthropic.Anthropic(api_key="k", base_url=base_url)
        assert sdk.messages.batches.list().data == []
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, proc.stderr.read() if proc.stderr else ""


def test_importing_the_emulator_does_not_import_airflow() -> None:
    code = (
        "import sys\n"
        "from airflow_provider_fable.emulator import EmulatorServer, create_app\n"
        "create_app()\n"
        "bad = [m for m in sys.modules if m == 'airflow' or m.startswith('airflow.')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=_env(), timeout=60)


def test_settings_accept_dicts_and_comma_strings() -> None:
    settings = EmulatorSettings(faults={"http_error_codes": "429, 500", "invalid_kinds": ["bad_enum"]})
    assert settings.faults.http_error_codes == (429, 500)
    assert settings.faults.invalid_kinds == ("bad_enum",)

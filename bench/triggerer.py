"""Benchmark: thousands of deferred waits in one event loop, ours vs the official provider's trigger.

What a triggerer pays per wait: N concurrent waits poll the emulator from one asyncio loop for a
fixed wall time; each contender runs in its own fresh process (with Airflow's task SDK loaded, as
in a triggerer, and nothing else), and reports

- CPU milliseconds per poll in the steady window (process CPU / polls served). A poll is one
  wait learning its batch's status once: for the official trigger one retrieve the emulator
  served; for ours one status the coalesced poller delivered to a wait (its list pages and
  fallback retrieves are counted apart, as ``api_calls``);
- the share of one core the process used in the window (measured, not extrapolated);
- the worst event-loop lag (a 20 ms heartbeat's overshoot) during start-up and in the window.

Contenders: ``FableBatchTrigger`` (shared client per connection, coalesced list polling, jitter)
and the official ``airflow.providers.anthropic.triggers.batch.AnthropicBatchTrigger`` (sync SDK
per trigger through ``asyncio.to_thread``), installed by the ``bench`` extra. Every wait has its
own batch, created before the run (the newest of the workspace); the emulator runs in a separate
process (its CPU is not counted) and batches never end during the run. The window is a whole
number of poll intervals (``--intervals``) so it holds whole rounds.

Run: ``.venv/bin/python bench/triggerer.py [--waits 1000 10000] [--poll 20 60] [--intervals 2]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

KEY = "bench-key"
HEARTBEAT = 0.02


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _calls(base: str) -> dict[str, int]:
    with urllib.request.urlopen(f"{base}/_emulator/stats") as resp:
        return json.load(resp)["calls"]


def _retrieves(base: str) -> int:
    return _calls(base).get("retrieve", 0)


def _api_calls(base: str) -> int:
    calls = _calls(base)
    return calls.get("retrieve", 0) + calls.get("list", 0)


def _create_batches(base: str, count: int) -> list[str]:
    from concurrent.futures import ThreadPoolExecutor

    body = {"requests": [{"custom_id": "r0", "params": {"model": "claude-haiku-4-5", "max_tokens": 8,
                                                           "messages": [{"role": "user", "content": "x"}]}}]}  # fmt: skip

    def one(_: int) -> str:
        req = urllib.request.Request(
            f"{base}/v1/messages/batches",
            data=json.dumps(body).encode(),
            headers={"x-api-key": KEY, "content-type": "application/json", "anthropic-version": "2023-06-01"},
        )
        with urllib.request.urlopen(req) as resp:
            return json.load(resp)["id"]

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(count)))


# ----------------------------------------------------------------------------- one contender
async def _heartbeat(lags: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        await asyncio.sleep(HEARTBEAT)
        lags.append(time.perf_counter() - t - HEARTBEAT)


def _trigger(kind: str, batch_id: str, poll: float) -> object:
    if kind == "ours":
        from airflow_provider_fable.triggers.batch import FableBatchTrigger

        return FableBatchTrigger(batch_ids=[batch_id], poll_interval=poll, deadline=time.time() + 86400)
    from airflow.providers.anthropic.triggers.batch import AnthropicBatchTrigger

    return AnthropicBatchTrigger(conn_id="anthropic_default", batch_id=batch_id, poll_interval=poll,
                                 end_time=time.time() + 86400)  # fmt: skip


async def _run_worker(kind: str, base: str, ids: list[str], waits: int, poll: float, window: float) -> dict:
    async def wait(n: int) -> None:
        async for _ in _trigger(kind, ids[n % len(ids)], poll).run():
            return

    def served() -> int:
        # Ours: status reads delivered to waits by the coalesced poller (one per wait per turn).
        from airflow_provider_fable.triggers.poller import batch_poller

        return batch_poller("fable_default").stats["polls"]

    async def polls_now() -> int:
        if kind == "ours":
            return served()
        return await asyncio.to_thread(_retrieves, base)  # official: one retrieve per poll

    stop = asyncio.Event()
    lags: list[float] = []
    beat = asyncio.ensure_future(_heartbeat(lags, stop))
    tasks = [asyncio.ensure_future(wait(n)) for n in range(waits)]
    # Start-up: every wait builds what it needs and polls at least once (one poll interval + slack).
    await asyncio.sleep(poll * 1.5)
    startup_lag = max(lags, default=0.0)
    lags.clear()
    calls0 = await asyncio.to_thread(_api_calls, base)
    wall0, cpu0, polls0 = time.perf_counter(), time.process_time(), await polls_now()
    await asyncio.sleep(window)
    wall1, cpu1, polls1 = time.perf_counter(), time.process_time(), await polls_now()
    calls1 = await asyncio.to_thread(_api_calls, base)
    elapsed = wall1 - wall0  # longer than the window when the loop falls behind
    steady_lag = max(lags, default=0.0)
    stop.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, beat, return_exceptions=True)
    polls = polls1 - polls0
    return {
        "kind": kind,
        "waits": waits,
        "polls": polls,
        "api_calls": calls1 - calls0,
        "cpu_ms_per_poll": (cpu1 - cpu0) * 1000 / max(polls, 1),
        "core_share": (cpu1 - cpu0) / elapsed,
        "startup_lag_ms": startup_lag * 1000,
        "steady_lag_ms": steady_lag * 1000,
        "polls_per_s": polls / elapsed,
    }


def worker(args: argparse.Namespace) -> None:
    import logging

    # What a triggerer has loaded before any trigger runs; the contenders import the rest.
    import airflow.sdk  # noqa: F401
    import airflow.sdk.execution_time.supervisor  # noqa: F401
    import airflow.triggers.base  # noqa: F401

    logging.getLogger().setLevel(logging.WARNING)
    with open(os.environ["BENCH_BATCH_IDS_FILE"]) as f:
        ids = json.load(f)
    result = asyncio.run(_run_worker(args.worker, args.base, ids, args.waits_one, args.poll, args.window))
    print(json.dumps(result))


# ----------------------------------------------------------------------------- driver
def _run_contender(kind: str, base: str, ids: list[str], waits: int, poll: float, window: float) -> dict:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(ids, f)  # 10,000 ids are too long for one environment variable
    env = dict(os.environ)
    env.update(
        {
            "BENCH_BATCH_IDS_FILE": f.name,
            "AIRFLOW_CONN_FABLE_DEFAULT": json.dumps({"conn_type": "fable", "password": KEY, "host": base}),
            "AIRFLOW_CONN_ANTHROPIC_DEFAULT": json.dumps(
                {"conn_type": "anthropic", "password": KEY, "host": base}
            ),
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        }
    )
    cmd = [sys.executable, __file__, "--worker", kind, "--base", base, "--waits-one", str(waits),
           "--poll", str(poll), "--window", str(window)]  # fmt: skip
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    finally:
        os.unlink(f.name)
    if out.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--waits", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument(
        "--poll", type=float, nargs="+", default=[20.0, 60.0],
        help="poll interval of every wait (s), one per --waits entry (the last one repeats)",
    )  # fmt: skip
    parser.add_argument(
        "--intervals", type=float, default=2.0,
        help="steady-state measurement window, in poll intervals",
    )  # fmt: skip
    parser.add_argument("--window", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--waits-one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.poll = args.poll[0]
        worker(args)
        return
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    emulator = subprocess.Popen(
        [sys.executable, "-m", "airflow_provider_fable.emulator", "--port", str(port),
         "--processing-seconds", "1000000", "--api-key", KEY],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.time() + 60
        while True:
            try:
                _retrieves(base)
                break
            except OSError:
                if time.time() > deadline or emulator.poll() is not None:
                    raise SystemExit("the emulator did not start") from None
                time.sleep(0.2)
        for i, waits in enumerate(args.waits):
            poll = args.poll[min(i, len(args.poll) - 1)]
            window = poll * args.intervals
            # One batch per wait, as in a deployment (the newest batches of the workspace).
            ids = _create_batches(base, waits)
            ours = _run_contender("ours", base, ids, waits, poll, window)
            official = _run_contender("official", base, ids, waits, poll, window)
            for r in (ours, official):
                print(
                    f"{r['kind']:>8}: waits={waits} poll_s={poll:g} window_s={window:g} polls={r['polls']} "
                    f"({r['polls_per_s']:.0f}/s) api_calls={r['api_calls']} "
                    f"cpu_ms_per_poll={r['cpu_ms_per_poll']:.3f} core_share={r['core_share']:.1%} "
                    f"worst_lag_ms startup={r['startup_lag_ms']:.0f} steady={r['steady_lag_ms']:.0f}",
                    flush=True,
                )
            # 10,000 waits at a 60 s poll = 166.7 polls/s; extrapolated from the measured CPU per poll.
            core_share = ours["cpu_ms_per_poll"] / 1000 * 10000 / 60
            print(
                f"bench triggerer: waits={waits} poll_s={poll:g} "
                f"ours_cpu_ms_per_poll={ours['cpu_ms_per_poll']:.3f} "
                f"official_cpu_ms_per_poll={official['cpu_ms_per_poll']:.3f} "
                f"ours_worst_lag_ms={max(ours['startup_lag_ms'], ours['steady_lag_ms']):.0f} "
                f"official_worst_lag_ms={max(official['startup_lag_ms'], official['steady_lag_ms']):.0f} "
                f"ours_core_share_measured={ours['core_share']:.1%} "
                f"ours_10k_waits_60s_poll_core_share_extrapolated={core_share:.1%} "
                f"vs_baseline={official['cpu_ms_per_poll'] / max(ours['cpu_ms_per_poll'], 1e-9):.2f}",
                flush=True,
            )
    finally:
        emulator.terminate()
        emulator.wait(10)


if __name__ == "__main__":
    main()

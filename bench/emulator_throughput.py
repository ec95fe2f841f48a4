"""Benchmark: how fast the emulator answers a batch and validates a create, against the previous emulator.

What is timed is the emulator's own work, in process (no HTTP client in the measure):

- **answers**: a batch of N requests is created (its body decoded by ``parse_create_body``, as
  the server does), ended by a retrieve (instant processing) and its results file downloaded
  to the last line; ``rps`` = N / (end + download seconds), which is
  everything the emulator does between "the batch's time has come" and "the last result line
  was sent": outcomes, validation of the params, prompt-cache accounting, the answers and the
  JSON lines. Workloads: ``e2e``, the records and schema ``bench/end_to_end.py`` submits
  (``bench/submit.py``'s ``records`` and ``Answer``, a label enum, a boolean and a summary with
  a description-only ``maxLength``), and the bundled datasets of the example DAGs as
  ``bench/emulator_answers.py`` builds them (tickets, crm, cancellations, documents; repeated
  with new custom_ids up to N), default fault settings.
- **create**: ``parse_create_body`` on the bytes of a 100,000-request e2e create body (97 MB),
  the synchronous part of ``POST /v1/messages/batches``: decoding and the envelope checks.
- **identical**: the sha256 of the result lines of the first ``--check`` requests of each
  workload, at default and at raised fault rates (errored, broken answers, broken hints,
  invented quotes), with the random batch and request ids pinned: the same lines in both
  emulators means the answers are as plausible as before by construction. The lines are
  compared as a set: results now come in windows of 1,000 requests shuffled within each (a
  batch of up to 1,000 is served in the earlier order), and ours must not be in request
  order. Ours answers in its worker processes here whatever the size
  (``generation_min_batch=1``), the path large batches take; a warm emulator (``--warmup``)
  is timed, a fresh one checked.
- **rss**: how much the emulator process grew while ending the batch and streaming its
  results (``VmHWM`` after minus RSS before); the parsed requests themselves are the create's.
- **http**: one e2e batch of ``--http-requests`` through a real emulator process started as
  bench/end_to_end.py starts it (1 s processing): create, poll every 0.2 s until ended, stream
  the results; seconds per phase as the client sees them.

The baseline is the emulator as committed on ``--baseline-ref`` (default 9c18f1e, main after
the first #19 emulator work, before the answerer's redesign), unpacked
with ``git archive`` into a temporary directory and run in its own process in the same run;
ours runs from this working tree the same way. ``vs_baseline`` = ours/baseline answers per
second on the ``e2e`` workload; each workload's own ratio is reported as ``<name>_vs_baseline``.

Run: ``.venv/bin/python bench/emulator_throughput.py`` (``--requests N`` for ours,
``--baseline-requests N`` for the slower baseline, ``--workloads e2e tickets``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
WORKLOADS = ("e2e", "tickets", "crm", "cancellations", "documents")
# bench/end_to_end.py's prompt (the records and the schema come from bench/submit.py).
PROMPT = "Subject: {subject}\n\n{body}"
SYSTEM = "Triage the support ticket: label, urgency and a one-line summary."
MODEL = "claude-fable-5"
#: main after the first #19 emulator work (streamed results, fast creates), before the answerer
#: work of #19 item 3 (an earlier baseline, 059749a, is main before any #19 emulator work).
BASELINE_REF = "9c18f1e"


def _workload(name: str) -> list[tuple[str, dict[str, Any]]]:
    """(custom_id, params) of one workload, in this process (the current tree's builders)."""
    sys.path.insert(0, str(BENCH))
    sys.path.insert(0, str(ROOT))
    if name == "e2e":
        import anthropic
        from submit import Answer, records

        schema = anthropic.transform_schema(Answer)
        return [
            (
                r["id"],
                {
                    "model": MODEL,
                    "max_tokens": 1024,
                    "system": SYSTEM,
                    "messages": [{"role": "user", "content": PROMPT.format(**r)}],
                    "output_config": {"format": {"type": "json_schema", "schema": schema}},
                },
            )
            for r in records(20_000)
        ]
    import emulator_answers as ea

    dataset = {
        "tickets": lambda: ea._tickets(None),
        "crm": lambda: ea._crm(None)[0],
        "cancellations": lambda: ea._cancellations(None),
        "documents": lambda: ea._documents(None),
    }[name]()
    return [(r["custom_id"], r["params"]) for _, r in dataset.items]


def _repeat(pairs: list[tuple[str, Any]], n: int) -> list[tuple[str, Any]]:
    """``n`` requests: the workload repeated, later rounds with their own custom_ids."""
    out = []
    for i in range(n):
        custom_id, params = pairs[i % len(pairs)]
        out.append((custom_id if i < len(pairs) else f"{custom_id}-{i // len(pairs)}", params))
    return out


# ------------------------------------------------------------------------------------- child
def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _child(args: argparse.Namespace) -> None:
    """Runs inside the emulator under test (PYTHONPATH picks old or new); prints one JSON line."""
    import gc
    import itertools

    import airflow_provider_fable.emulator.state as st
    from airflow_provider_fable.emulator.settings import EmulatorSettings, FaultSettings

    counter = itertools.count()
    st.random_id = lambda prefix: f"{prefix}{next(counter):024d}"  # pinned ids: comparable bytes
    st.new_request_id = lambda: "req_pinned"
    pairs = []
    if args.pairs:
        with open(args.pairs, "rb") as f:
            pairs = pickle.load(f)
    faults = (
        FaultSettings()
        if args.faults == "default"
        else FaultSettings(
            errored_rate=0.05,
            invalid_answer_rate=0.05,
            description_break_rate=0.05,
            invented_quote_rate=0.05,
            seed=1,
        )
    )
    out: dict[str, Any] = {"code": st.__file__}
    if args.n:
        # The requests come the way the server gets them: a create body through parse_create_body.
        body = json.dumps({"requests": [{"custom_id": c, "params": p} for c, p in _repeat(pairs, args.n)]})
        request_ids = [c for c, _ in _repeat(pairs, args.n)] if args.keep_lines else []
        gc.collect()
        requests = st.parse_create_body(body.encode())
        del body
        settings: dict[str, Any] = {"processing_seconds": 0, "faults": faults}
        if "generation_min_batch" in EmulatorSettings.model_fields:
            # Ours answers a batch of any size in its worker processes, so the byte-for-byte
            # check covers the path large batches take; the baseline has no such setting.
            settings["generation_min_batch"] = 1
        store = st.BatchStore(EmulatorSettings(**settings))
        if args.warmup:
            # A long-running emulator: its answer workers started and its memos warm. A first
            # batch (other custom_ids, same records) is answered before the timed one.
            body = json.dumps(
                {
                    "requests": [
                        {"custom_id": f"w{i}", "params": p} for i, (_, p) in enumerate(pairs[: args.warmup])
                    ]
                }
            )
            warm = store.create(st.parse_create_body(body.encode()), "http://127.0.0.1/")
            store.retrieve(warm["id"], "http://127.0.0.1/")
            for _ in store.open_results(warm["id"]).chunks():
                pass
            del body
        batch = store.create(requests, "http://127.0.0.1/")
        del requests
        rss_before = _rss_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM: the peak from here on
        digest = hashlib.sha256()
        received = bytearray()
        lines = 0
        started = time.perf_counter()
        store.retrieve(batch["id"], "http://127.0.0.1/")
        for chunk in store.open_results(batch["id"]).chunks():
            digest.update(chunk)
            if args.keep_lines:
                received += chunk
            lines += chunk.count(b"\n")
        elapsed = time.perf_counter() - started
        del pairs
        out.update(
            n=args.n,
            lines=lines,
            seconds=elapsed,
            rps=args.n / elapsed,
            digest=digest.hexdigest(),
            # The lines whatever their order (results come in windows of requests, shuffled
            # within each: a multi-window batch's order is not the earlier emulator's).
            lines_digest=hashlib.sha256(b"\n".join(sorted(bytes(received).splitlines()))).hexdigest(),
            in_request_order=bool(received)
            and [json.loads(line)["custom_id"] for line in bytes(received).splitlines()] == request_ids,
            rss_growth_mb=(_rss_kb("VmHWM") - rss_before) / 1024,
        )
    if args.create_body:
        raw = Path(args.create_body).read_bytes()
        gc.collect()
        started = time.perf_counter()
        parsed = st.parse_create_body(raw)
        elapsed = time.perf_counter() - started
        out.update(create_n=len(parsed), create_seconds=elapsed, create_rps=len(parsed) / elapsed)
    print(json.dumps(out))


# ------------------------------------------------------------------------------------- http
def _http_round(code: Path, body: bytes, n: int) -> dict[str, float]:
    """One batch through a real emulator process (``python -m airflow_provider_fable.emulator``,
    1 s processing, as bench/end_to_end.py starts it): create, poll until ended, stream the
    results to the last line. Seconds per phase, from this (client) side."""
    import httpx

    env = {**os.environ, "PYTHONPATH": str(code)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "airflow_provider_fable.emulator", "--port", "0", "--processing-seconds", "1"],
        cwd=tempfile.gettempdir(),
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip().rsplit(" ", 1)[-1]
        headers = {"x-api-key": "k", "anthropic-version": "2026-10-21", "content-type": "application/json"}
        with httpx.Client(base_url=url, headers=headers, timeout=600) as client:
            started = time.perf_counter()
            batch = client.post("/v1/messages/batches", content=body).raise_for_status().json()
            created = time.perf_counter()
            polls = 0
            while True:
                polls += 1
                state = client.get(f"/v1/messages/batches/{batch['id']}").raise_for_status().json()
                if state["processing_status"] == "ended":
                    break
                time.sleep(0.2)
            ended = time.perf_counter()
            lines = 0
            with client.stream("GET", state["results_url"]) as stream:
                for chunk in stream.iter_bytes():
                    lines += chunk.count(b"\n")
            done = time.perf_counter()
        if lines != n:
            raise SystemExit(f"{code}: {lines} result lines for {n} requests")
        return {
            "create": created - started,
            "ended": ended - created,
            "download": done - ended,
            "total": done - started,
        }
    finally:
        proc.terminate()
        proc.wait(30)


# ------------------------------------------------------------------------------------ parent
def _run(code: Path, *argv: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(code)}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *argv],
        cwd=tempfile.gettempdir(),  # not ROOT: the tree under test comes from PYTHONPATH only
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({code}):\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    if not result["code"].startswith(str(code)):
        raise SystemExit(f"child ran {result['code']}, not the tree under {code}")
    return result


def _baseline_tree(ref: str, into: Path) -> Path:
    archive = subprocess.run(
        ["git", "archive", "--format=tar", ref, "airflow_provider_fable"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    tar_path = into / "baseline.tar"
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as tar:
        tar.extractall(into / "tree", filter="data")
    return into / "tree"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pairs", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--faults", default="default", help=argparse.SUPPRESS)
    parser.add_argument("--create-body", help=argparse.SUPPRESS)
    parser.add_argument("--keep-lines", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--warmup",
        type=int,
        default=2000,
        help="requests answered by each emulator before the timed batch (0: a cold emulator)",
    )
    parser.add_argument(
        "--baseline-ref",
        default=BASELINE_REF,
        help=f"git ref of the previous emulator (default {BASELINE_REF}: main before this work)",
    )
    parser.add_argument("--requests", type=int, default=5_000, help="requests per workload")
    parser.add_argument(
        "--baseline-requests",
        type=int,
        default=None,
        help="requests per workload for the baseline (default: same)",
    )
    parser.add_argument(
        "--check",
        type=int,
        default=2500,
        help="requests per workload whose result lines are compared byte for byte",
    )
    parser.add_argument("--create-requests", type=int, default=100_000, help="requests in the create body")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument(
        "--http-requests", type=int, default=20_000, help="e2e requests in one batch over HTTP (0: skip)"
    )
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return 0

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-emulator-") as tmp:
        tmpdir = Path(tmp)
        old = _baseline_tree(args.baseline_ref, tmpdir)
        new = ROOT
        summary: dict[str, str] = {}
        identical = checked = 0
        e2e_ratio = None
        for name in args.workloads:
            pairs_path = tmpdir / f"{name}.pkl"
            pairs_path.write_bytes(pickle.dumps(_workload(name)))
            warm = ("--warmup", str(args.warmup))
            ours = _run(new, "--pairs", str(pairs_path), "--n", str(args.requests), *warm)
            theirs = _run(
                old, "--pairs", str(pairs_path), "--n", str(args.baseline_requests or args.requests), *warm
            )
            same = []
            for faults in ("default", "raised"):
                cold = ("--warmup", "0")  # a fresh emulator: the prompt cache's first write included
                keep = ("--keep-lines",)
                a = _run(
                    new, "--pairs", str(pairs_path), "--n", str(args.check), "--faults", faults, *cold, *keep
                )
                b = _run(
                    old, "--pairs", str(pairs_path), "--n", str(args.check), "--faults", faults, *cold, *keep
                )
                same.append(a["lines_digest"] == b["lines_digest"] and not a["in_request_order"])
            checked += len(same)
            identical += sum(same)
            ratio = ours["rps"] / theirs["rps"]
            if name == "e2e":
                e2e_ratio = ratio
            print(
                f"{name:13s} ours: {ours['n']} requests {ours['seconds']:.1f} s = {ours['rps']:.0f}/s "
                f"(rss +{ours['rss_growth_mb']:.0f} MB) | baseline: {theirs['n']} requests "
                f"{theirs['seconds']:.1f} s = {theirs['rps']:.0f}/s (rss +{theirs['rss_growth_mb']:.0f} MB) "
                f"| x{ratio:.1f} | identical lines: {'yes' if all(same) else 'NO'} ({args.check} x 2 fault settings)",
                flush=True,
            )
            summary[f"{name}_rps"] = f"{ours['rps']:.0f}"
            summary[f"{name}_baseline_rps"] = f"{theirs['rps']:.0f}"
            summary[f"{name}_vs_baseline"] = f"{ratio:.2f}"
        body_path = tmpdir / "create.json"
        e2e_pairs = _workload("e2e")
        requests = [
            {"custom_id": custom_id, "params": params}
            for custom_id, params in _repeat(e2e_pairs, args.create_requests)
        ]
        body_path.write_bytes(json.dumps({"requests": requests}).encode())
        size_mb = body_path.stat().st_size / 1e6
        del requests
        ours_c = _run(new, "--create-body", str(body_path))
        theirs_c = _run(old, "--create-body", str(body_path))
        print(
            f"create        ours: {ours_c['create_n']} requests ({size_mb:.0f} MB) {ours_c['create_seconds']:.2f} s "
            f"= {ours_c['create_rps']:.0f}/s | baseline: {theirs_c['create_seconds']:.2f} s = "
            f"{theirs_c['create_rps']:.0f}/s | x{ours_c['create_rps'] / theirs_c['create_rps']:.1f}",
            flush=True,
        )
        if args.http_requests:
            requests = [{"custom_id": c, "params": p} for c, p in _repeat(e2e_pairs, args.http_requests)]
            body = json.dumps({"requests": requests}).encode()
            del requests
            ours_h, theirs_h = (
                _http_round(new, body, args.http_requests),
                _http_round(old, body, args.http_requests),
            )
            for who, h in (("ours", ours_h), ("baseline", theirs_h)):
                print(
                    f"http {who:8s} {args.http_requests} e2e requests: create {h['create']:.1f} s, ended "
                    f"{h['ended']:.1f} s later, results streamed in {h['download']:.1f} s: "
                    f"{h['total']:.1f} s = {args.http_requests / h['total']:.0f} requests/s end to end",
                    flush=True,
                )
            summary["http_total_s"] = f"{ours_h['total']:.1f}"
            summary["http_baseline_total_s"] = f"{theirs_h['total']:.1f}"
    summary["create_rps"] = f"{ours_c['create_rps']:.0f}"
    summary["create_baseline_rps"] = f"{theirs_c['create_rps']:.0f}"
    summary["identical"] = f"{identical}/{checked}"
    print(f"({time.perf_counter() - started:.0f} s)")
    line = " ".join(f"{k}={v}" for k, v in summary.items())
    ratio_text = f"{e2e_ratio:.2f}" if e2e_ratio is not None else "n/a"
    print(f"bench emulator_throughput: {line} vs_baseline={ratio_text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: a batch results file -> validated rows as a Parquet file.

- ours: ``parse_result_line`` -> ``load_batch`` -> ``core.parquet.ParquetSink`` (one row group
  per 10,000-result chunk, rejects file too).
- baseline, the SDK user's path of bench/load.py with ``DataFrame.to_parquet`` of the accepted
  rows and of the rejects instead of ``to_sql``.

Both in their own process on the same synthetic file (bench/load.py's generator), same
accepted/rejected split checked before printing. Ends with
``bench parquet: rows=... ours_rows_s=... baseline_rows_s=... ours_rss_mb=... baseline_rss_mb=...
vs_baseline=...``.

Run: ``.venv/bin/python bench/parquet.py --rows 100000``
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import load as common  # noqa: E402 - bench/load.py: data generator, model, SDK path


def child_ours(path: str, rows: int, out: str) -> dict:
    import pyarrow as pa

    from airflow_provider_fable.core.loading import LoadStats, load_batch
    from airflow_provider_fable.core.parquet import ParquetSink
    from airflow_provider_fable.core.results import parse_result_line

    # pyarrow imports pandas at its first conversion; the baseline imports pandas before its
    # timer too, so this one-time import is kept out of both timings.
    pa.array([0])
    stats = LoadStats()
    cpu_start, start = time.process_time(), time.perf_counter()
    with ParquetSink(
        f"{out}/ours.parquet", id_column="ticket_id", output_model=common.TicketTriage,
        rejects_path=f"{out}/ours_rejects.parquet",
    ) as sink:  # fmt: skip
        load_batch(
            map(parse_result_line, common._lines(path, rows)), batch_id=common.BATCH_ID,
            output_model=common.TicketTriage, sink=sink, stats=stats,
        )  # fmt: skip
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "accepted": stats.accepted,
        "rejected": stats.rejected,
        "cpu_start": cpu_start,
    }


def child_baseline(path: str, rows: int, out: str) -> dict:
    import pandas as pd
    from anthropic._models import construct_type_unchecked
    from anthropic.types.messages import MessageBatchIndividualResponse
    from pydantic import ValidationError

    cpu_start, start = time.process_time(), time.perf_counter()
    good, bad = [], []
    for line in common._lines(path, rows):
        item = construct_type_unchecked(value=json.loads(line), type_=MessageBatchIndividualResponse)
        result = item.result
        if result.type != "succeeded":
            bad.append({"record_id": item.custom_id, "reason": result.type})
            continue
        message = result.message
        text = "".join(b.text for b in message.content if b.type == "text")
        if message.stop_reason == "max_tokens":
            bad.append({"record_id": item.custom_id, "reason": "truncated"})
            continue
        try:
            answer = common.TicketTriage.model_validate_json(text, strict=True)
        except ValidationError as exc:
            bad.append({"record_id": item.custom_id, "reason": str(exc)[:200]})
            continue
        good.append(
            {
                "ticket_id": item.custom_id, **answer.model_dump(mode="json"), "_batch_id": common.BATCH_ID,
                "_model": message.model, "_input_tokens": message.usage.input_tokens,
                "_output_tokens": message.usage.output_tokens,
            }
        )  # fmt: skip
    pd.DataFrame(good).to_parquet(f"{out}/base.parquet", index=False)
    pd.DataFrame(bad).to_parquet(f"{out}/base_rejects.parquet", index=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "accepted": len(good), "rejected": len(bad), "cpu_start": cpu_start}


CHILDREN = {"ours": child_ours, "baseline": child_baseline}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--child", choices=sorted(CHILDREN))
    parser.add_argument("--file")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        result = CHILDREN[args.child](args.file, args.rows, args.out)
        result["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["cpu"] = time.process_time() - result.pop("cpu_start")
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory(prefix="fable-bench-parquet-") as tmp:
        path = Path(tmp) / "results.jsonl"
        common.make_file(path, args.rows)
        figures = {}
        for kind in CHILDREN:
            out = subprocess.run(
                [sys.executable, __file__, "--child", kind, "--file", str(path), "--rows", str(args.rows),
                 "--out", tmp],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            figures[kind] = json.loads(out.stdout.strip().splitlines()[-1])
        split = {(f["accepted"], f["rejected"]) for f in figures.values()}
        if len(split) != 1:
            raise SystemExit(f"paths disagree: {figures}")
        import pyarrow.parquet as pq

        if pq.read_metadata(f"{tmp}/ours.parquet").num_rows != figures["ours"]["accepted"]:
            raise SystemExit("ours.parquet does not hold the accepted rows")
        print(f"  rows={args.rows} accepted/rejected={split.pop()} "
              + " ".join(f"{k}={v['seconds']:.2f}s(cpu {v['cpu']:.2f}s)/{v['rss_mb']:.0f}MB"
                         for k, v in figures.items()))  # fmt: skip
        ours, base = (args.rows / figures[k]["seconds"] for k in ("ours", "baseline"))
        print(
            f"bench parquet: rows={args.rows} ours_rows_s={ours:.0f} baseline_rows_s={base:.0f} "
            f"ours_rss_mb={figures['ours']['rss_mb']:.0f} baseline_rss_mb={figures['baseline']['rss_mb']:.0f} "
            f"vs_baseline={ours / base:.2f}"
        )


if __name__ == "__main__":
    main()

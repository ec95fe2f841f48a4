"""Benchmark: picking a pilot sample from a large source, streaming bottom-k vs load-then-sample.

Ours = ``core.sampling.sample`` (keyed-hash bottom-k: one pass, a heap of k records). Baseline =
the obvious script: read every record into a list, then ``random.Random(seed).sample(rows, k)``.
Both take k records out of the same generated source; the figure that matters is peak memory
(``tracemalloc``), which for ours is bounded by k and for the baseline grows with the source. Time
is reported too: hashing every id costs CPU the baseline does not spend.

Run: ``.venv/bin/python bench/pilot_sample.py [--records 1000000] [--k 200]``
"""

from __future__ import annotations

import argparse
import random
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

from airflow_provider_fable.core.sampling import sample


def source(n: int) -> Iterator[dict[str, Any]]:
    """Records shaped like the bundled tickets (an id and ~300 characters of text)."""
    body = "My order was marked as shipped ten days ago but the tracking page has not changed. " * 4
    for i in range(n):
        yield {
            "ticket_id": f"TCK-{i:09d}",
            "channel": "email",
            "subject": f"Ticket {i}",
            "body": body + str(i),
        }


def measure(fn: Callable[[], list[dict[str, Any]]]) -> tuple[float, int, list[dict[str, Any]]]:
    """Wall time of a plain run, then peak memory of a second run under tracemalloc (which slows
    allocation-heavy code several-fold, so it is kept out of the timed run)."""
    started = time.perf_counter()
    picked = fn()
    elapsed = time.perf_counter() - started
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return elapsed, peak, picked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--k", type=int, default=200)
    args = parser.parse_args()

    def ours() -> list[dict[str, Any]]:
        return sample(source(args.records), args.k, seed=0, key=lambda r: r["ticket_id"])[0]

    def baseline() -> list[dict[str, Any]]:
        rows = list(source(args.records))
        return random.Random(0).sample(rows, args.k)

    base_s, base_peak, base_picked = measure(baseline)
    ours_s, ours_peak, ours_picked = measure(ours)
    assert len(ours_picked) == len(base_picked) == args.k
    # Spread check: the pilot has ids from every decile of the source.
    deciles = {int(r["ticket_id"][4:]) * 10 // args.records for r in ours_picked}
    assert deciles == set(range(10)), deciles
    print(
        f"records={args.records} k={args.k} baseline={base_s:.2f}s peak={base_peak / 1e6:.1f}MB "
        f"ours={ours_s:.2f}s peak={ours_peak / 1e6:.2f}MB"
    )
    print(
        f"bench pilot_sample: records={args.records} k={args.k} ours_peak_mb={ours_peak / 1e6:.2f} "
        f"baseline_peak_mb={base_peak / 1e6:.1f} ours_s={ours_s:.2f} baseline_s={base_s:.2f} "
        f"vs_baseline={base_peak / ours_peak:.1f}"
    )


if __name__ == "__main__":
    main()

"""bench: parse time of each example DAG file vs an empty DAG file with one @task.

What is measured, and why this way
----------------------------------
Airflow 3's DAG processor parses every file in a fresh child process forked from a long-lived
parent (the manager), after pre-importing in the parent the ``airflow.*`` modules the file
imports (``[dag_processor] parsing_pre_import_modules``, on by default) and with the parent's
heap frozen (``gc.freeze()``). Anything else the file imports at the top - the provider's
operators, pydantic models, the SDK if someone is careless - is paid again on every parse. This
benchmark reproduces that: one parent process holds Airflow, pre-imports each file's ``airflow.*``
imports, freezes its heap, then forks one child per parse; the child executes the DAG file the
way the DagBag does. Baseline and candidates are interleaved in the same parent, so machine load
affects both alike. The child reports its wall time and its CPU time; the ratio judged
(``vs_baseline``) is the CPU time's, because on a shared machine the wall time of a 30 ms parse
also counts the time other processes held the core (both are printed; on an idle machine they
agree). Byte-code is cached (in a temporary ``pycache_prefix``) after a warm-up round, as it is
on a real deployment, even when the environment sets ``PYTHONDONTWRITEBYTECODE``.

The baseline is the smallest useful DAG: ``DAG(...)`` with one ``@task``. The target of the
examples is ``vs_baseline`` (the slowest example's median CPU time over the baseline's) < 1.5;
``worst_wall_vs_baseline`` is the same on wall time.

Run: ``python bench/dag_parse.py [--rounds 15]`` (also part of ``make bench``).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = [
    "dags/support_ticket_triage.py",
    "dags/crm_lead_enrichment.py",
    "dags/document_summaries.py",
    "dags/cancellation_reason_cleanup.py",
]
BASELINE = """from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, task

with DAG(dag_id="empty_baseline", schedule=None, start_date=datetime(2026, 1, 1)) as dag:

    @task
    def noop() -> None:
        pass

    noop()
"""


#: Reference only (not a target): the baseline plus the provider's operator imports, to show how
#: much of an example's parse time is the provider's own import cost.
WITH_PROVIDER = BASELINE.replace(
    "from airflow.sdk import DAG, task\n",
    "from airflow.sdk import DAG, task\n\n"
    "from airflow_provider_fable.operators.load import FableValidateLoadOperator  # noqa: F401\n"
    "from airflow_provider_fable.operators.submit import FableBatchSubmitOperator  # noqa: F401\n"
    "from airflow_provider_fable.sensors.batch import FableBatchSensor  # noqa: F401\n",
)


def _parse_in_child(path: str) -> tuple[float, float]:
    """Fork; the child executes the DAG file once and sends back (wall, CPU) seconds it took."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: what DagBag does for one file
        os.close(read)
        status = 0
        try:
            name = "unusual_prefix_bench_" + Path(path).stem
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            started, cpu_started = time.perf_counter(), time.process_time()
            spec.loader.exec_module(module)
            elapsed = time.perf_counter() - started
            cpu = time.process_time() - cpu_started
            if not any(type(v).__name__ == "DAG" for v in vars(module).values()):
                raise RuntimeError(f"{path} defines no DAG")
            os.write(write, f"{elapsed!r} {cpu!r}\n".encode())
        except BaseException as exc:  # noqa: BLE001 - report anything to the parent
            os.write(write, f"error {exc!r}\n".encode())
            status = 1
        finally:
            os._exit(status)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 4096):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    answer = b"".join(chunks).decode().strip()
    if answer.startswith("error"):
        raise SystemExit(f"parsing {path} failed: {answer}")
    wall, cpu = answer.split()
    return float(wall), float(cpu)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="dag-parse-bench-"))
    sys.dont_write_bytecode = False
    sys.pycache_prefix = str(tmp / "pycache")
    os.environ.setdefault("AIRFLOW_HOME", str(tmp / "airflow"))
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    baseline = tmp / "empty_dag.py"
    baseline.write_text(BASELINE)
    reference = tmp / "empty_dag_with_provider_imports.py"
    reference.write_text(WITH_PROVIDER)
    files = [str(baseline), str(reference), *(str(ROOT / p) for p in EXAMPLES)]

    # The parent: what the DAG processor manager holds before it forks a parser.
    import airflow.dag_processing.manager  # noqa: F401
    import airflow.dag_processing.processor  # noqa: F401
    from airflow.utils.file import iter_airflow_imports

    for path in files:
        for module in iter_airflow_imports(path):
            importlib.import_module(module)
    gc.collect()
    gc.freeze()

    for path in files:  # warm-up: byte-code cache, page cache
        _parse_in_child(path)
    samples: dict[str, list[tuple[float, float]]] = {p: [] for p in files}
    for _ in range(args.rounds):
        for path in files:
            samples[path].append(_parse_in_child(path))

    def median(path: str, kind: int) -> float:
        return statistics.median(sample[kind] for sample in samples[path])

    wall_base, cpu_base = median(str(baseline), 0), median(str(baseline), 1)
    print(f"{'file':<40} {'wall ms':>8} {'vs empty':>9} {'CPU ms':>8} {'vs empty':>9}")
    labels = {
        str(baseline): "(baseline) empty DAG with one @task",
        str(reference): "(reference) + provider operator imports",
    }
    wall_ratio, cpu_ratio = {}, {}
    for path in files:
        wall, cpu = median(path, 0), median(path, 1)
        wall_ratio[path], cpu_ratio[path] = wall / wall_base, cpu / cpu_base
        name = labels.get(path, Path(path).name)
        print(f"{name:<40} {wall * 1000:>8.1f} {wall_ratio[path]:>9.2f} {cpu * 1000:>8.1f} {cpu_ratio[path]:>9.2f}")
    examples = files[2:]
    worst = max(examples, key=lambda p: cpu_ratio[p])
    print(
        f"bench dag_parse: rounds={args.rounds} baseline_cpu_ms={cpu_base * 1000:.1f} "
        f"baseline_wall_ms={wall_base * 1000:.1f} worst={Path(worst).stem} "
        f"worst_cpu_ms={median(worst, 1) * 1000:.1f} "
        f"provider_imports_cpu_ms={(median(str(reference), 1) - cpu_base) * 1000:.1f} "
        f"worst_wall_vs_baseline={max(wall_ratio[p] for p in examples):.2f} "
        f"vs_baseline={cpu_ratio[worst]:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

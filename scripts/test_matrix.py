"""The compatibility matrix: the built wheel, resolved fresh, against each supported Airflow and Python.

``make test-matrix`` (and ``.ci/test-matrix``, which CI runs on demand) runs it; ``make test`` does
not (a cell resolves and installs a whole Airflow: minutes each). Each cell:

1. makes a fresh virtualenv under the scratch directory (``uv venv --python <interpreter>``); when
   the cell's interpreter is not on this machine the cell is SKIPPED with a visible message (and
   the run fails under ``--strict``);
2. installs the wheel built from this tree with its extras and the test dependencies, the
   resolver free to pick every other version (``uv pip install '<wheel>[...]' 'apache-airflow==3.X.*'``;
   the lowest-direct cell adds ``--resolution lowest-direct``, which takes the floors that
   ``pyproject.toml`` declares);
3. checks that ``airflow providers list`` registers the provider and that the example DAGs parse
   with no import error (a DagBag of ``dags/``);
4. runs the test suite (or the cell's declared subset, see ``FAST``) from a copy of the tree WITHOUT
   the package sources, so the tests import the installed wheel and not ``airflow_provider_fable/``;
5. prints the pass/fail counts and the versions the resolver picked.

A summary table ends the run, also written as JSON (``<scratch>/results.json``) for
``docs/compatibility.md``. Exit status: non-zero when a cell that ran failed.

    python scripts/test_matrix.py                  # every cell, the fast subset
    python scripts/test_matrix.py --full           # every cell, the whole suite (~11 min a cell)
    python scripts/test_matrix.py --cells af3.1-py3.11,lowest-direct --full
    python scripts/test_matrix.py --list
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The extras a user installs for the whole feature set, plus what the test suite itself needs.
EXTRAS = "postgres,parquet,testing,celery"
TEST_DEPS = ["pytest-asyncio>=1.0"]  # 0.23 breaks on the pytest 9 that the testing extra resolves

# The packages whose resolved versions the summary (and docs/compatibility.md) reports.
KEY_PACKAGES = (
    "apache-airflow", "apache-airflow-core", "apache-airflow-task-sdk", "anthropic", "pydantic",
    "pandas", "numpy", "sqlalchemy", "apache-airflow-providers-common-sql",
    "apache-airflow-providers-sqlite", "apache-airflow-providers-postgres", "psycopg2-binary",
    "pyarrow", "fastapi", "orjson", "msgspec",
)  # fmt: skip

# The fast subset: the provider's registration, the ticket example DAG end to end (dag.test,
# the real SDK against the emulator, SQLite), the exactly-once guarantees across retries and
# clears: a few minutes instead of the whole suite's ~11 (more on a loaded machine). Every cell
# also parses all four example DAGs and registers the provider (the smoke step).
FAST = [
    "tests/test_provider.py",
    "tests/test_dag_triage.py::test_triage_dag_end_to_end",
    "tests/test_exactly_once.py",
]

# Not run in a cell: the matrix itself is this test (build the wheel, install it fresh, list
# the providers), and it builds from the package sources that a cell's tree leaves out.
DESELECT = ["tests/test_packaging.py"]


@dataclass(frozen=True)
class Cell:
    name: str
    python: str  # "3.11"
    airflow: str  # a requirement: "apache-airflow==3.1.8"
    lowest_direct: bool = False
    # Constraints the resolver must honour that are Airflow's own (not ours), with the reason.
    constraints: tuple[str, ...] = ()
    note: str = ""
    # pip instead of uv, the bare wheel (no extras), the smoke step only: a user's pip install.
    pip_smoke: bool = False


CELLS = [
    Cell("af3.1-py3.11", "3.11", "apache-airflow==3.1.8"),
    Cell(
        "af3.2-py3.11",
        "3.11",
        "apache-airflow==3.2.2",
        constraints=("fastapi<0.137",),
        note="Airflow 3.2 does not bound fastapi; >=0.137 breaks its execution API (Airflow's "
        "constraints file pins it): the cell installs fastapi<0.137 as Airflow's constraints do",
    ),
    Cell("af3.3-py3.11", "3.11", "apache-airflow==3.3.2"),
    Cell("af3.3-py3.10", "3.10", "apache-airflow==3.3.2"),
    Cell("af3.3-py3.13", "3.13", "apache-airflow==3.3.2"),
    Cell(
        "lowest-direct",
        "3.11",
        "apache-airflow==3.1.8",
        lowest_direct=True,
        note="--resolution lowest-direct: every direct dependency at the floor pyproject.toml declares",
    ),
    Cell(
        "pip-af3.1",
        "3.11",
        "apache-airflow==3.1.8",
        pip_smoke=True,
        note="pip (python -m venv + pip install), the bare wheel into the lowest supported Airflow: "
        "the provider registers and the example DAGs parse; no test suite",
    ),
]


@dataclass
class Result:
    cell: str
    python: str = ""
    airflow: str = ""
    status: str = "not run"  # pass | fail | skipped | install-failed
    detail: str = ""
    ran: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    smoke: str = ""
    seconds: float = 0.0


def say(msg: str) -> None:
    print(msg, flush=True)


def find_python(version: str) -> str | None:
    """An interpreter of ``version`` that runs: pyenv's versions, then ``pythonX.Y`` on PATH; else None.

    pyenv's shims are on PATH for every version but fail for one that is not selected, so each
    candidate is run once before it is trusted.
    """
    candidates = []
    for root in filter(None, [os.environ.get("PYENV_ROOT", ""), str(Path.home() / ".pyenv")]):
        candidates += sorted(glob.glob(f"{root}/versions/{version}.*/bin/python{version}"), reverse=True)
    on_path = shutil.which(f"python{version}")
    if on_path:
        candidates.append(on_path)
    for exe in candidates:
        probe = subprocess.run(
            [exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True, text=True
        )
        if probe.returncode == 0 and probe.stdout.strip() == version:
            return exe
    return None


def uv() -> list[str]:
    found = shutil.which("uv")
    return [found] if found else [sys.executable, "-m", "uv"]


def run(cmd: list[str], log: Path, **kwargs: object) -> int:
    """Run ``cmd`` with its output appended to ``log``; return the exit status."""
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, **kwargs).returncode  # type: ignore[call-overload]


def runtime_requirements(wheel: Path) -> list[str]:
    """The wheel's own requirements (unconditional + the postgres and parquet extras), markers off.

    uv's lowest-direct applies to the requirements given on its command line; the wheel's are
    transitive from there, so the lowest-direct cell passes them explicitly to take their floors.
    """
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        lines = zf.read(meta).decode().splitlines()
    reqs = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req, _, marker = line.removeprefix("Requires-Dist:").strip().partition(";")
        if not marker or re.search(r"extra == .(postgres|parquet).", marker):
            reqs.append(req.strip())
    return reqs


def build_wheel(scratch: Path) -> Path:
    dist = scratch / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    log = scratch / "build.log"
    if run([*uv(), "build", "--quiet", "--wheel", "--out-dir", str(dist), str(ROOT)], log) != 0:
        raise SystemExit(f"building the wheel failed: see {log}")
    (wheel,) = dist.glob("airflow_provider_fable-*.whl")
    return wheel


def test_tree(scratch: Path) -> Path:
    """The repository's tracked files minus the package sources: tests import the installed wheel."""
    tree = scratch / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for rel in files:
        if rel.startswith("airflow_provider_fable/") or not (ROOT / rel).is_file():
            continue
        dest = tree / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest)
    return tree


def freeze(python: Path) -> dict[str, str]:
    out = subprocess.run(
        [*uv(), "pip", "freeze", "--python", str(python)], capture_output=True, text=True
    ).stdout
    versions = {}
    for line in out.splitlines():
        name, sep, version = line.partition("==")
        if sep and name.lower() in KEY_PACKAGES:
            versions[name.lower()] = version
    return versions


SMOKE = r"""
import os, sys
from airflow.providers_manager import ProvidersManager
providers = ProvidersManager().providers
assert "airflow-provider-fable" in providers, sorted(providers)
try:
    from airflow.dag_processing.dagbag import DagBag
except ImportError:  # Airflow < 3.2
    from airflow.models.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])  # no example DAGs: AIRFLOW__CORE__LOAD_EXAMPLES=False
assert not bag.import_errors, bag.import_errors
assert len(bag.dag_ids) >= 4, bag.dag_ids
import airflow_provider_fable
assert "site-packages" in airflow_provider_fable.__file__, airflow_provider_fable.__file__
print("provider registered:", providers["airflow-provider-fable"].version, "| DAGs parsed:", sorted(bag.dag_ids))
"""


def cell_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "VIRTUAL_ENV", "PYTHON"))}
    env |= {"AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    return env


def counts_from(text: str) -> dict[str, int]:
    """pytest's last summary line (``3 failed, 530 passed, 7 skipped in 610.2s``) as a dict."""
    lines = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    if not lines:
        return {}
    return {
        kind: int(n)
        for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", lines[-1])
    }


def smoke_only(res: Result, python: Path, base: Path, tree: Path, start: float) -> Result:
    """The pip cell: versions, then the smoke step (registration + example DAGs parse) as the verdict."""
    out = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True).stdout
    res.versions = {
        n.lower(): v
        for n, _, v in (ln.partition("==") for ln in out.splitlines())
        if n.lower() in KEY_PACKAGES
    }
    say(f"    resolved (pip): {', '.join(f'{k}=={v}' for k, v in sorted(res.versions.items()))}")
    home = base / "airflow_home"
    home.mkdir(exist_ok=True)
    smoke = subprocess.run(
        [str(python), "-c", SMOKE, str(tree / "dags")],
        cwd=base,
        env=cell_env(home),
        capture_output=True,
        text=True,
    )
    ok = smoke.returncode == 0
    res.smoke = (
        (smoke.stdout.strip().splitlines() or [""])[-1]
        if ok
        else ("FAILED: " + (smoke.stderr.strip().splitlines() or ["?"])[-1])
    )
    res.ran = "smoke only (providers list + example DAGs parse)"
    res.status = "pass" if ok else "fail"
    res.seconds = round(time.monotonic() - start, 1)
    say(f"    smoke: {res.smoke}")
    say(f"--- {res.cell}: {res.status.upper()} in {res.seconds:.0f}s")
    return res


def run_cell(
    cell: Cell, wheel: Path, tree: Path, scratch: Path, full: bool, pytest_args: list[str], fast: list[str]
) -> Result:
    res = Result(cell.name, python=cell.python, airflow=cell.airflow)
    start = time.monotonic()
    interp = find_python(cell.python)
    if interp is None:
        res.status = "skipped"
        res.detail = f"no Python {cell.python} interpreter on this machine (PATH, pyenv)"
        say(f"!!! SKIPPED {cell.name}: {res.detail}")
        return res
    base = scratch / cell.name
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    log = base / "cell.log"
    venv = base / "venv"
    python = venv / "bin" / "python"
    say(f"=== {cell.name}: Python {cell.python} ({interp}), {cell.airflow}; log {log}")
    if cell.note:
        say(f"    note: {cell.note}")
    if cell.pip_smoke:
        made = run([interp, "-m", "venv", str(venv)], log) == 0
        made = (
            made and run([str(python), "-m", "pip", "install", "--quiet", str(wheel), cell.airflow], log) == 0
        )
        if not made:
            res.status, res.detail = "install-failed", f"python -m venv / pip install failed: see {log}"
            say(f"!!! {cell.name}: {res.detail}")
            return res
        return smoke_only(res, python, base, tree, start)
    if run([*uv(), "venv", "--quiet", "--python", interp, str(venv)], log) != 0:
        res.status, res.detail = "install-failed", "uv venv failed"
        return res
    install = [
        *uv(),
        "pip",
        "install",
        "--python",
        str(python),
        f"{wheel}[{EXTRAS}]",
        cell.airflow,
        *TEST_DEPS,
    ]
    install += list(cell.constraints)
    if cell.lowest_direct:
        floors = runtime_requirements(wheel)
        say(f"    lowest-direct on the wheel's requirements: {' '.join(floors)}")
        install += [*floors, "--resolution", "lowest-direct"]
    if run(install, log) != 0:
        res.status, res.detail = "install-failed", f"the resolve/install failed: see {log}"
        say(f"!!! {cell.name}: {res.detail}")
        return res
    res.versions = freeze(python)
    say(f"    resolved: {', '.join(f'{k}=={v}' for k, v in sorted(res.versions.items()))}")

    home = base / "airflow_home"
    home.mkdir()
    env = cell_env(home)
    smoke = subprocess.run(
        [str(python), "-c", SMOKE, str(tree / "dags")], cwd=base, env=env, capture_output=True, text=True
    )
    res.smoke = (
        (smoke.stdout.strip().splitlines() or [""])[-1]
        if smoke.returncode == 0
        else ("FAILED: " + (smoke.stderr.strip().splitlines() or ["?"])[-1])
    )
    say(f"    smoke (providers list + example DAGs parse): {res.smoke}")

    selection = [] if full else list(fast)
    res.ran = "full suite" if full else "subset: " + " ".join(fast)
    deselect = [f"--ignore={p}" for p in DESELECT]
    cmd = [str(venv / "bin" / "pytest"), "-q", "-p", "no:cacheprovider", *deselect, *selection, *pytest_args]
    say(f"    pytest: {res.ran}")
    pytest_log = base / "pytest.log"
    with pytest_log.open("w") as out:
        rc = subprocess.run(
            cmd, cwd=tree, env=env | {"CI": "true"}, stdout=out, stderr=subprocess.STDOUT
        ).returncode
    text = pytest_log.read_text(errors="replace")
    res.counts = counts_from(text)
    failed = [ln for ln in text.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
    for line in failed[:30]:
        say(f"      {line[:200]}")
    ok = rc == 0 and smoke.returncode == 0
    res.status = "pass" if ok else "fail"
    res.detail = "" if ok else f"pytest exit {rc}, smoke exit {smoke.returncode}; log {pytest_log}"
    res.seconds = round(time.monotonic() - start, 1)
    say(f"--- {cell.name}: {res.status.upper()} {res.counts} in {res.seconds:.0f}s")
    return res


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cells", help="comma-separated cell names (default: all)")
    parser.add_argument("--full", action="store_true", help="the whole suite in every cell (default: FAST)")
    parser.add_argument("--full-cells", default="", help="comma-separated cells that run the whole suite")
    parser.add_argument("--tests", default="", help="comma-separated pytest selection replacing FAST")
    parser.add_argument("--scratch", default=os.environ.get("FABLE_MATRIX_DIR", "/tmp/fable-test-matrix"))
    parser.add_argument(
        "--strict", action="store_true", help="a skipped cell (missing interpreter) fails the run"
    )
    parser.add_argument("--list", action="store_true", help="list the cells and exit")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args()
    if args.list:
        for c in CELLS:
            found = find_python(c.python) or "MISSING"
            say(
                f"{c.name:16} python {c.python} ({found})  {c.airflow}{'  lowest-direct' if c.lowest_direct else ''}"
            )
        return 0
    wanted = set(args.cells.split(",")) if args.cells else {c.name for c in CELLS}
    unknown = wanted - {c.name for c in CELLS}
    if unknown:
        raise SystemExit(f"unknown cells: {sorted(unknown)}")
    full_cells = set(filter(None, args.full_cells.split(",")))
    fast = [t for t in args.tests.split(",") if t] or FAST
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    wheel = build_wheel(scratch)
    tree = test_tree(scratch)
    say(f"wheel: {wheel.name}; test tree (no package sources): {tree}")
    results = []
    for cell in CELLS:
        if cell.name in wanted:
            results.append(
                run_cell(
                    cell, wheel, tree, scratch, args.full or cell.name in full_cells, args.pytest_args, fast
                )
            )
    out = scratch / "results.json"
    previous = json.loads(out.read_text()) if out.exists() else {}
    previous.update({r.cell: asdict(r) for r in results})
    out.write_text(json.dumps(previous, indent=2))
    say("\n== summary ==")
    for r in results:
        pins = " ".join(
            f"{k.removeprefix('apache-airflow-')}={v}"
            for k, v in r.versions.items()
            if k in ("apache-airflow", "anthropic", "pydantic", "pandas", "numpy", "sqlalchemy")
        )
        say(f"{r.cell:16} {r.status.upper():14} {r.counts} {pins} {r.detail}")
    say(f"results: {out}")
    bad = [r for r in results if r.status in ("fail", "install-failed")]
    skipped = [r for r in results if r.status == "skipped"]
    if skipped:
        say(f"SKIPPED (interpreter missing): {', '.join(r.cell for r in skipped)}")
    return 1 if bad or (args.strict and skipped) else 0


if __name__ == "__main__":
    sys.exit(main())

# One-command entry points. `make test` is what CI runs (.ci/run); `make demo` is the quick start.
# Everything is installed by these rules from the committed lock (requirements.lock) with uv.
# --compile-bytecode: uv does not write .pyc files by default (pip does), so every process
# (tests, Airflow's CLI, the SQLite load's writer process) would compile its imports from source.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# A uv on PATH wins; otherwise the one pip installs for $(PYTHON) (bootstrapped by `install`).
UV     := $(or $(shell command -v uv 2>/dev/null),$(PYTHON) -m uv)
# uv ignores pip.conf; point it at the system CA bundle when there is one.
export SSL_CERT_FILE ?= $(wildcard /etc/ssl/certs/ca-certificates.crt)

.PHONY: install test test-matrix demo lint lock bench dist clean browser

install: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml Makefile
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv \
		|| $(PYTHON) -m pip install --quiet --user --break-system-packages uv
	@test -x $(PY) || $(UV) venv --quiet --python $(PYTHON) $(VENV)
	$(UV) pip sync --quiet --compile-bytecode --python $(PY) requirements.lock
	$(UV) pip install --quiet --python $(PY) --no-deps -e .
	@touch $@

# Debian's headless Chromium + chromedriver for tests/test_ui_deployment.py (the Backlogs page),
# installed when missing (CI runs as root; elsewhere through sudo when there is one).
browser:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver; }

# mypy: the whole package, core/ held to --strict ([tool.mypy] in pyproject.toml).
test: install browser
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest -q -p no:cacheprovider

# The compatibility matrix (docs/compatibility.md): the built wheel resolved fresh against each
# supported Airflow minor and Python, plus a lowest-direct cell. Not part of `make test` (minutes a
# cell); CI runs it on demand through .ci/test-matrix. MATRIX_ARGS="--full" runs the whole suite,
# MATRIX_ARGS="--cells af3.1-py3.11" one cell; the script says when an interpreter is missing.
test-matrix: install
	$(PY) scripts/test_matrix.py $(MATRIX_ARGS)

# `make demo` runs the ticket DAG; `make demo DAG=crm_lead_enrichment` (or document_summaries,
# cancellation_reason_cleanup) runs a pattern DAG and prints its own summary.
demo: install
	$(PY) scripts/demo.py $(if $(DAG),--dag $(DAG))

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

bench: install
	$(PY) bench/parse_validate.py
	$(PY) bench/load.py
	$(PY) bench/load_hook.py
	$(PY) bench/pilot_sample.py
	$(PY) bench/parquet.py
	$(PY) bench/submit.py
	$(PY) bench/triggerer.py
	$(PY) bench/dag_parse.py
	$(PY) bench/ledger.py
	$(PY) bench/emulator_answers.py
	$(PY) bench/ui.py
	$(PY) bench/end_to_end.py

# A wheel and an sdist in dist/ (what `pip install dist/airflow_provider_fable-*.whl` installs).
dist:
	rm -rf dist
	$(UV) build --quiet --sdist --wheel --out-dir dist .

# Re-resolve the lock after changing dependencies in pyproject.toml.
lock:
	$(UV) pip compile pyproject.toml --extra postgres --extra parquet --extra emulator --extra testing --extra dev --extra bench --extra celery --universal --python-version 3.10 -o requirements.lock

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache dist build *.egg-info

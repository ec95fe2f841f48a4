"""``airflow fable ...``: the provider's CLI commands (registered through ``get_provider_info()["cli"]``).

Airflow 3's CLI asks every provider's ``cli`` functions for their commands at start-up, so this
module must stay cheap: it imports only ``airflow.cli.cli_config`` names and points each command
at :mod:`airflow_provider_fable.cli.commands` lazily (``lazy_load_command``). The queries live in
``core.report`` (no Airflow), the commands only find the ledger and print.
"""

from __future__ import annotations

from typing import Any


def get_fable_cli_commands() -> list[Any]:
    """The ``fable`` command group (what ``get_provider_info()["cli"]`` points at)."""
    from airflow.cli.cli_config import ActionCommand, Arg, GroupCommand, lazy_load_command

    ledger = Arg(
        ("--ledger-conn-id",),
        help="Airflow SQL connection holding the ledger (default: the fable connection's "
        "ledger_conn_id extra, else the embedded $AIRFLOW_HOME/fable_ledger.db)",
    )
    fable_conn = Arg(
        ("--fable-conn-id",), help="The fable connection (default fable_default)", default="fable_default"
    )
    output = Arg(("-o", "--output"), help="Output format", choices=("table", "json", "csv"), default="table")
    job = Arg(("job",), help="Job id (the job fingerprint) or a unique prefix of it")
    dag = Arg(("--dag-id",), help="Only jobs submitted by this DAG")
    retryable = Arg(
        ("--retryable",), help="Only retryable rejects (what rerun='retryable' sends)", action="store_true"
    )
    limit = Arg(("--limit",), help="At most this many rows", type=int, default=None)
    dag_id = Arg(("dag_id",), help="The DAG whose submit tasks to estimate")
    conf = Arg(("-c", "--conf"), help="JSON run conf (params) for the estimate, as for `dags trigger`")

    def cmd(name: str, help: str, args: tuple[Any, ...]) -> Any:
        return ActionCommand(
            name=name,
            help=help,
            func=lazy_load_command(f"airflow_provider_fable.cli.commands.{name}"),
            args=args,
        )

    return [
        GroupCommand(
            name="fable",
            help="Backlogs run through Anthropic's Message Batches API (the fable provider's ledger)",
            subcommands=[
                cmd("jobs", "List jobs: DAG, stage, model, records by status, cost vs estimate",
                    (dag, output, ledger, fable_conn, limit)),
                cmd("status", "One job: counts, batches, top reject reasons, cost", (job, output, ledger, fable_conn)),
                cmd("failed", "A job's rejected records (what a failed-records rerun sends)",
                    (job, retryable, output, ledger, fable_conn)),
                cmd("review", "A job's records needing review", (job, output, ledger, fable_conn, limit)),
                cmd("estimate", "Projected cost per stage of a DAG run, nothing paid (estimate-only run)",
                    (dag_id, conf, output)),
            ],
        )
    ]  # fmt: skip

"""Operator extra link: from a submit, sensor or batch task to its batches in the Claude Console.

Airflow 3 resolves extra links in the worker when the task finishes or defers (``finalize``) and
stores the URL in XCom for the UI, so ``get_link`` sees the executed operator: the batch ids are
the ones it actually used (rendered templates, ids created by the submit).

The URL is the one Anthropic's batch-processing guide gives for monitoring batches ("visit the
Console"): ``/settings/workspaces/default/batches`` on the Console, now served from
platform.claude.com (console.anthropic.com is its former host). The guide documents no page per
batch, so a guessed per-batch path is not used: the link opens the workspace's batch list, with
the batch ids in the task log. When the task used exactly one batch, the link says which in its
fragment (``#msgbatch_...``), which the page ignores if it has no anchor for it.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperatorLink

#: The Console's Message Batches page of the (default) workspace, as Anthropic's docs link it.
CONSOLE_BATCHES_URL = "https://platform.claude.com/settings/workspaces/default/batches"


def console_url(batch_ids: list[str]) -> str:
    if len(batch_ids) == 1:
        return f"{CONSOLE_BATCHES_URL}#{batch_ids[0]}"
    return CONSOLE_BATCHES_URL


class FableBatchLink(BaseOperatorLink):
    """ "Anthropic console" button on tasks that create or wait on batches."""

    name = "Anthropic console"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        from airflow_provider_fable.core.manifest import normalise_batch_ids

        ids = getattr(operator, "link_batch_ids", None)
        if ids is None:
            try:  # the submit operator's manifest (its return value)
                from airflow.sdk.execution_time.xcom import XCom

                ids = XCom.get_value(ti_key=ti_key, key="return_value")
            except Exception:  # noqa: BLE001 - no link is better than a failed task finalize
                ids = None
        try:
            ids = normalise_batch_ids(ids) if ids else []
        except ValueError:
            ids = []
        return console_url(ids) if ids else ""

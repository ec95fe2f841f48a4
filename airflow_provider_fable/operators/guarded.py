"""The seed's guardrails as operator mixins: pilot, estimate and budget cap, QA sample, checks.

Kept apart from ``submit.py`` and ``load.py`` so those stay about their own flow: each operator
calls a few methods of its mixin at fixed points (before the first create; after the rows are
loaded) and the work is done by the pure core modules (``core.sampling``, ``core.estimate``,
``core.cost``, ``core.qa``, ``core.guardrails``).

Where measured output lives: every load counts, per (job, batch), the succeeded results and
their output tokens in the job ledger (``Ledger.count_batch_usage``); every later estimate of the
*same job* (same fingerprint: same prompt, model and schema), pilot or full run, first stage or
an escalation, uses their mean (``Ledger.measured_output``). The ledger, not an Airflow Variable:
it survives the metadata database and every run feeds it, not only ``sample=`` submits.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from typing import IO, TYPE_CHECKING, Any

from airflow_provider_fable.retries import not_retried

if TYPE_CHECKING:  # the core is imported where it is used: a DAG file that imports an operator
    # pays for none of it at parse time (bench/dag_parse.py)
    from airflow_provider_fable.core.estimate import Estimate
    from airflow_provider_fable.core.job import BatchJob

_CUSTOM_ID = rb'"custom_id":"((?:[^"\\]|\\.)*)"'  # compiled on first use (parse time)


def opt_int(value: Any, what: str) -> int | None:
    """A templated int param: '' / 'None' / None / 0 mean "off"."""
    if value in (None, "", "None", "none", "null", 0, "0", False):
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an integer, got {value!r}") from None
    if number < 0:
        raise ValueError(f"{what} must be >= 0, got {number}")
    return number or None


def opt_float(value: Any, what: str) -> float | None:
    if value in (None, "", "None", "none", "null"):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None


class SubmitGuardrailsMixin:
    """Pilot sampling, pre-submit estimate and budget cap for ``FableBatchSubmitOperator``."""

    sample: Any
    sample_seed: int
    max_cost_usd: Any
    prices: Any
    estimate_sample: int
    output_tokens_per_request: float | None
    qa_excerpts: int
    qa_seed: int
    id_field: str
    log: Any

    # -- pilot ----------------------------------------------------------------------------
    def _pilot_size(self) -> int | None:
        return opt_int(self.sample, "sample")

    def _sampled(self, records: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """The seeded pilot sample of the source (streaming, ``sample`` records in memory)."""
        from airflow_provider_fable.core.errors import RecordError
        from airflow_provider_fable.core.sampling import BottomK

        size = self._pilot_size()
        if size is None:
            yield from records
            return
        chooser: BottomK[dict[str, Any]] = BottomK(size, self.sample_seed)
        for position, record in enumerate(records, 1):
            if self.id_field not in record:
                raise RecordError(None, "id.missing", f"record has no id field {self.id_field!r}", position)
            chooser.offer(record[self.id_field], record)
        self._source_seen = chooser.seen
        self.log.info(
            "Pilot: %d of %d source records, seeded sample (seed %s) spread over the whole source",
            len(chooser), chooser.seen, self.sample_seed,
        )  # fmt: skip
        yield from chooser.items()

    def _excerpt_tap(self, records: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Keep the records a QA sample (same seed) can pick, to record their input excerpts."""
        from airflow_provider_fable.core.sampling import BottomK

        self._excerpt_chooser: BottomK[dict[str, Any]] = BottomK(self.qa_excerpts, self.qa_seed)
        for record in records:
            if self.id_field in record:
                self._excerpt_chooser.offer(str(record[self.id_field]), record)
            yield record

    def _excerpts(self, job: BatchJob) -> dict[str, str]:
        from airflow_provider_fable.core.errors import RecordError
        from airflow_provider_fable.core.qa import excerpt
        from airflow_provider_fable.core.requests import render_prompt

        chooser = getattr(self, "_excerpt_chooser", None)
        if chooser is None:
            return {}
        out: dict[str, str] = {}
        for record in chooser.items():
            try:
                out[str(record[self.id_field])] = excerpt(render_prompt(job, record, record[self.id_field]))
            except RecordError:
                continue
        return out

    # -- estimate ---------------------------------------------------------------------------
    def _price_table(self, hook: Any) -> dict[str, Any]:
        from airflow_provider_fable.core.cost import merge_prices

        return merge_prices(hook.price_overrides, self.prices)

    def _sample_spool(self, spool: IO[bytes], k: int, seed: int | str) -> list[dict[str, Any]]:
        """A seeded sample of the spooled requests, read back by offset (k requests in memory)."""
        from airflow_provider_fable.core.sampling import BottomK

        custom_id = re.compile(_CUSTOM_ID)
        chooser: BottomK[int] = BottomK(k, seed)
        spool.seek(0)
        offset = 0
        for line in spool:
            match = custom_id.search(line, 0, 400)
            chooser.offer(match.group(1).decode() if match else offset, offset)
            offset += len(line)
        picked = []
        for off in chooser.items():
            spool.seek(off)
            picked.append(json.loads(spool.readline()))
        return picked

    #: count_tokens calls in flight during the estimate (the API limits count_tokens per minute;
    #: the SDK waits out a 429 as it does for any call).
    COUNT_CONCURRENCY = 4

    def _count_sample(self, hook: Any, sample: list[dict[str, Any]]) -> list[int]:
        """``hook.count_tokens`` of every sampled request, in order, a few calls at a time.

        Why: the estimate's 50 calls are 50 round trips before the first create; one after the
        other they cost the submit ~50 x the API's latency. The first call runs alone (it builds
        the hook's client); an error is raised as the sequential loop would have raised it."""
        if len(sample) <= 1:
            return [hook.count_tokens(params) for params in sample]
        from concurrent.futures import ThreadPoolExecutor

        first = hook.count_tokens(sample[0])
        with ThreadPoolExecutor(self.COUNT_CONCURRENCY, thread_name_prefix="fable-count") as pool:
            return [first, *pool.map(hook.count_tokens, sample[1:])]

    def _prefix_tokens(self, hook: Any, job: BatchJob, params: dict[str, Any], full: int) -> int:
        """Tokens of the shared (cacheable) prefix: a request minus the same request without it."""
        if not job.cache_prompt_prefix or not (job.system_prompt or job.few_shot_examples):
            return 0
        bare = {k: v for k, v in params.items() if k != "system"}
        bare["messages"] = params["messages"][-1:]
        return max(0, full - hook.count_tokens(bare))

    def _measured_output(self, ledger: Any, job: BatchJob) -> tuple[float, str, bool] | None:
        """Mean output tokens per succeeded request the ledger measured on this job's loads."""
        if ledger is None:
            return None
        try:
            measured = ledger.measured_output(job.fingerprint())
        except Exception as exc:  # noqa: BLE001 - a missing measurement only weakens the estimate
            self.log.warning("Could not read the measured output tokens from the ledger (%s)", exc)
            return None
        if not measured:
            return None
        source = "the pilot" if measured["pilot_only"] else "earlier loads of this job"
        detail = (
            f"measured: mean of {measured['requests']} succeeded results in {measured['batches']} "
            f"batch(es) loaded by {source}"
            + (f" (runs {', '.join(measured['runs'][:3])})" if measured["runs"] else "")
        )
        return measured["mean"], detail, measured["pilot_only"]

    def _estimate_before_submit(
        self,
        hook: Any,
        job: BatchJob,
        spool: IO[bytes],
        shards: list[tuple[int, int]],
        *,
        ledger: Any = None,
        enforce_budget: bool = True,
    ) -> dict[str, Any]:
        """Count, extrapolate, log and check the budget. Raises before any create when over it.

        Returns the manifest entries (``estimate``, ``pilot``, ``qa_excerpts``). With
        ``enforce_budget=False`` (an estimate-only run) an estimate over the cap is reported as
        ``over_budget`` instead of raised: nothing will be paid either way.
        """
        from airflow_provider_fable.core.cost import UnknownPriceError, require_price
        from airflow_provider_fable.core.errors import FableError
        from airflow_provider_fable.core.estimate import (
            OUTPUT_FROM_PILOT,
            OUTPUT_GIVEN,
            OUTPUT_MEASURED,
            OUTPUT_UPPER_BOUND,
            BudgetExceededError,
            check_budget,
            estimate_run,
        )

        total = sum(count for _, count in shards)
        pilot_size = self._pilot_size()
        extra: dict[str, Any] = {
            "pilot": (
                {
                    "sample": pilot_size,
                    "seed": self.sample_seed,
                    "source_records": getattr(self, "_source_seen", None),
                }
                if pilot_size is not None
                else False
            ),
        }
        max_cost = opt_float(self.max_cost_usd, "max_cost_usd")
        if not total or not self.estimate_sample:
            if max_cost is not None and total:
                raise ValueError("max_cost_usd needs the estimate: estimate_sample must be > 0")
            return extra
        prices = self._price_table(hook)
        if max_cost is not None and enforce_budget:
            try:  # an unpriced model under a cap: refuse before counting
                require_price(job.model, prices)
            except UnknownPriceError as exc:
                raise not_retried(exc) from None
        sampled = self._sample_spool(spool, self.estimate_sample, self.sample_seed)
        try:
            counts = self._count_sample(hook, [r["params"] for r in sampled])
            prefix = self._prefix_tokens(hook, job, sampled[0]["params"], counts[0])
        except FableError as exc:
            if getattr(exc, "unknown_model", False):  # no request can succeed: refuse, do not retry
                from airflow_provider_fable.hooks.fable import UnknownModelError

                raise not_retried(
                    UnknownModelError(
                        f"model {job.model!r} is not known to the API; nothing was submitted: {exc}"
                    )
                ) from None
            if max_cost is not None:
                raise FableError(
                    f"max_cost_usd={max_cost} is set but the estimate failed, so the budget can not be "
                    f"checked; nothing was submitted. Cause: {exc}"
                ) from exc
            # Without a cap the estimate is information, not a gate: do not block the run on it.
            self.log.warning("No cost estimate: count_tokens failed (%s); submitting without one", exc)
            return extra
        given = opt_float(self.output_tokens_per_request, "output_tokens_per_request")
        if given is not None:
            output, basis, detail = given, OUTPUT_GIVEN, f"given: output_tokens_per_request={given}"
        elif (measured := self._measured_output(ledger, job)) is not None:
            output, detail = measured[0], measured[1]
            basis = OUTPUT_FROM_PILOT if measured[2] else OUTPUT_MEASURED
        else:
            output, basis, detail = None, OUTPUT_UPPER_BOUND, None
        estimate: Estimate = estimate_run(
            model=job.model,
            requests=total,
            batches=len(shards),
            sample_counts=counts,
            prefix_tokens=prefix,
            max_tokens=job.max_tokens,
            cache_ttl=job.cache_ttl,
            output_per_request=output,
            output_basis=basis,
            output_basis_detail=detail,
            prices=prices,
        )
        self.log.info("%s", estimate.describe())
        if estimate.cost_usd is None:
            self.log.warning("Model %s has no known price: the run's cost is unknown, not zero", job.model)
        extra["estimate"] = estimate.as_dict()
        try:
            check_budget(estimate, max_cost)
        except (BudgetExceededError, UnknownPriceError) as exc:
            if not enforce_budget:
                self.log.warning("Estimate only: %s", exc)
                extra["over_budget"] = True
                return extra
            raise not_retried(exc) from None
        if max_cost is not None:
            self.log.info("Estimate $%.4f is within max_cost_usd $%.4f", estimate.cost_usd, max_cost)
            if not enforce_budget:
                extra["over_budget"] = False
        return extra

    def _after_submit(
        self, job: BatchJob, manifest: dict[str, Any], extra: dict[str, Any], context: Any
    ) -> None:
        manifest.update(extra)
        if self.qa_excerpts:
            manifest["qa_excerpts"] = {"seed": self.qa_seed, "records": self._excerpts(job)}


class LoadGuardrailsMixin:
    """QA sample, summary block and distribution guardrails for ``FableValidateLoadOperator``."""

    max_share: Any
    min_share: Any
    max_reject_rate: Any
    min_accepted: Any
    fail_when_all_rejected: bool
    qa_size: int
    qa_seed: Any
    qa_table: str | None
    submit_manifest: Any
    prices: Any
    table: str | None
    parquet_path: Any
    id_column: str
    log: Any

    def _check_guardrail_config(self, model_cls: Any) -> None:
        from airflow_provider_fable.core.guardrails import check_config, share_limits
        from airflow_provider_fable.core.loading import distribution_fields
        from airflow_provider_fable.core.sinks import resolve

        # Templated fields arrive rendered (strings): settle them once, before any check reads them.
        self.max_share = share_limits(self.max_share, "max_share")
        self.min_share = share_limits(self.min_share, "min_share")
        schema = model_cls.model_json_schema(by_alias=True)
        defs = schema.get("$defs", {})
        fields: dict[str, list[str] | None] = {}
        for name in distribution_fields(model_cls):
            target = resolve(schema["properties"][name], defs)
            fields[name] = [str(v) for v in target["enum"]] if "enum" in target else ["True", "False"]
        check_config(
            max_share=self.max_share,
            min_share=self.min_share,
            fields=fields,
            max_reject_rate=opt_float(self.max_reject_rate, "max_reject_rate"),
            min_accepted=opt_int(self.min_accepted, "min_accepted"),
        )
        rerun_rate = opt_float(getattr(self, "max_reject_rate_rerun", None), "max_reject_rate_rerun")
        if rerun_rate is not None and not 0 <= rerun_rate <= 1:
            raise ValueError(f"max_reject_rate_rerun must be a share in 0..1, got {rerun_rate!r}")

    def _submit_manifest(self) -> dict[str, Any]:
        value = self.submit_manifest
        if isinstance(value, str) and value.strip().startswith("{"):
            value = json.loads(value)
        return value if isinstance(value, dict) else {}

    def _finish_load(
        self, engine: Any, sink: Any, batch_ids: list[str], summary: dict[str, Any], context: Any
    ) -> dict[str, Any]:
        """QA sample, summary block (log + XCom), then the guardrails (which may fail the task).

        Runs after every row is written, so a breach fails the task with the rows in place.
        """
        from airflow_provider_fable.core.guardrails import (
            cache_hit_share,
            check_guardrails,
            format_summary,
            raise_on_breaches,
        )
        from airflow_provider_fable.core.qa import write_qa_sample

        submitted = self._submit_manifest()
        estimate = submitted.get("estimate") or {}
        summary["estimated_cost_usd"] = estimate.get("cost_usd")
        summary["pilot"] = submitted.get("pilot", False)
        summary["cache_hit_share"] = cache_hit_share(summary.get("usage") or {})
        if self.qa_size and engine is not None and sink is not None:  # no QA table for Parquet-only
            excerpts = (submitted.get("qa_excerpts") or {}).get("records") or {}
            seed = self.qa_seed
            if seed is None:
                seed = (submitted.get("qa_excerpts") or {}).get("seed", 0)
            name, rows = write_qa_sample(
                engine,
                table=sink.table,
                id_column=self.id_column,
                batch_ids=batch_ids,
                size=self.qa_size,
                seed=seed,
                excerpts=excerpts,
                qa_table=self.qa_table,
            )
            summary["qa_table"], summary["qa_rows"] = name, rows
        # A rerun of failed records has its own reject-rate rule (default: none).
        rule = "max_reject_rate_rerun" if submitted.get("rerun") else "max_reject_rate"
        summary["reject_rule"] = rule
        breaches = check_guardrails(
            summary,
            max_share=self.max_share,
            min_share=self.min_share,
            max_reject_rate=opt_float(getattr(self, rule, None), rule),
            min_accepted=opt_int(self.min_accepted, "min_accepted"),
            fail_when_all_rejected=self.fail_when_all_rejected,
            reject_rule=rule,
        )
        summary["guardrails"] = [b.message for b in breaches]
        self.log.info("\n%s", format_summary(summary))
        ti = context.get("ti") if isinstance(context, Mapping) else None
        if ti is not None and breaches:
            # A failing task pushes no return value: keep the summary readable next to the failure.
            ti.xcom_push(key="summary", value=summary)
        raise_on_breaches(
            breaches,
            table=self.table or str(self.parquet_path),
            rejects_table=summary.get("rejects_table") or "",
        )
        return summary

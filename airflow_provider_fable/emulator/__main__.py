"""``fable-emulator`` / ``python -m airflow_provider_fable.emulator``: serve the emulator.

One flag per setting, so a CI job or a developer can reproduce any fault scenario from the
shell. The "listening" line is printed (and flushed) only once requests are served, so
scripts can wait for it instead of polling.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType

from pydantic import ValidationError

from airflow_provider_fable.emulator.server import EmulatorServer
from airflow_provider_fable.emulator.settings import ENDPOINTS, INVALID_KINDS, EmulatorSettings, FaultSettings

__all__ = ["build_parser", "main", "settings_from_args"]


def build_parser() -> argparse.ArgumentParser:
    """The CLI: server address, then one flag per ``EmulatorSettings``/``FaultSettings`` field."""
    defaults = EmulatorSettings()
    fault_defaults = FaultSettings()
    parser = argparse.ArgumentParser(
        prog="fable-emulator",
        description="Local emulator of Anthropic's Message Batches API (for offline DAG tests).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    parser.add_argument("--port", type=int, default=8787, help="port (0 = any free port)")
    parser.add_argument("--log-level", default="warning", help="uvicorn log level")

    api = parser.add_argument_group("API behaviour")
    api.add_argument(
        "--processing-seconds",
        type=float,
        default=defaults.processing_seconds,
        help="seconds from create until a batch ends (0 = ended on the first retrieve)",
    )
    api.add_argument(
        "--processing-retrieves",
        type=int,
        default=defaults.processing_retrieves,
        help="end a batch on its N-th retrieve instead (deterministic waits for tests)",
    )
    api.add_argument(
        "--cancel-seconds",
        type=float,
        default=defaults.cancel_seconds,
        help="seconds a batch stays canceling",
    )
    api.add_argument(
        "--max-body-bytes", type=int, default=defaults.max_body_bytes, help="request body cap (413 above it)"
    )
    api.add_argument(
        "--min-cache-tokens",
        type=int,
        default=defaults.min_cache_tokens,
        help="smallest cacheable prompt prefix, in estimated tokens",
    )
    api.add_argument("--api-key", default=None, help="accept only this key (unset: any non-empty key)")
    api.add_argument(
        "--known-models",
        default=None,
        help="comma-separated model ids the API knows (default: the current Claude models and aliases; "
        "'*' accepts any model)",
    )
    api.add_argument(
        "--state",
        default=None,
        metavar="PATH",
        help="SQLite state file: batches, results and the clock survive a restart",
    )

    api.add_argument(
        "--generation-workers",
        type=int,
        default=defaults.generation_workers,
        help="worker processes that generate the answers of large batches (0: a thread of the "
        "emulator's own process; default: one per CPU, at most 4, none on a single CPU)",
    )
    api.add_argument(
        "--generation-min-batch",
        type=int,
        default=defaults.generation_min_batch,
        help="batches of at least this many requests are answered by the workers",
    )

    faults = parser.add_argument_group("fault injection")
    faults.add_argument(
        "--seed", type=int, default=fault_defaults.seed, help="reshuffles which requests/calls fail"
    )
    faults.add_argument(
        "--errored-rate",
        type=float,
        default=fault_defaults.errored_rate,
        help="share of requests ending errored (api_error/overloaded_error)",
    )
    faults.add_argument(
        "--expired-rate",
        type=float,
        default=fault_defaults.expired_rate,
        help="share of requests ending expired",
    )
    faults.add_argument(
        "--invalid-answer-rate",
        type=float,
        default=fault_defaults.invalid_answer_rate,
        help="share of structured/tool answers that are broken on purpose",
    )
    faults.add_argument(
        "--invalid-kinds",
        default=",".join(fault_defaults.invalid_kinds),
        help=f"comma-separated subset of {','.join(INVALID_KINDS)}",
    )
    faults.add_argument(
        "--http-error-rate",
        type=float,
        default=fault_defaults.http_error_rate,
        help="share of calls to the listed endpoints that fail",
    )
    faults.add_argument(
        "--http-error-codes",
        default=",".join(map(str, fault_defaults.http_error_codes)),
        help="comma-separated HTTP status codes",
    )
    faults.add_argument(
        "--http-error-endpoints",
        default=",".join(fault_defaults.http_error_endpoints),
        help=f"comma-separated subset of {','.join(ENDPOINTS)}",
    )
    faults.add_argument(
        "--http-error-first-n",
        type=int,
        default=fault_defaults.http_error_first_n,
        help="the first N calls to each listed endpoint fail",
    )
    faults.add_argument(
        "--retry-after-seconds",
        type=int,
        default=fault_defaults.retry_after_seconds,
        help="retry-after (seconds) sent with injected HTTP errors; the SDK waits that long",
    )
    faults.add_argument(
        "--retry-after-ms",
        type=int,
        default=fault_defaults.retry_after_ms,
        help="also send retry-after-ms (the SDK prefers it): fast retries for tests",
    )
    faults.add_argument(
        "--description-break-rate",
        type=float,
        default=fault_defaults.description_break_rate,
        help="share of description-only schema constraints (maxLength, maximum...) answers break",
    )
    faults.add_argument(
        "--invented-quote-rate",
        type=float,
        default=fault_defaults.invented_quote_rate,
        help="share of verbatim-quote fields (evidence, quote...) answered with a paraphrase instead",
    )
    faults.add_argument(
        "--transient-404-after-create",
        type=int,
        default=fault_defaults.transient_404_after_create,
        help="the first N retrieves of each new batch answer 404",
    )
    faults.add_argument(
        "--cut-results-after",
        type=int,
        default=fault_defaults.cut_results_after,
        help="cut results downloads after this many lines (unset: never)",
    )
    faults.add_argument(
        "--cut-results-times",
        type=int,
        default=fault_defaults.cut_results_times,
        help="how many downloads of each batch are cut",
    )
    faults.add_argument(
        "--lose-create-response-first-n",
        type=int,
        default=fault_defaults.lose_create_response_first_n,
        help="the first N creates make the batch, then lose the response",
    )
    faults.add_argument(
        "--lose-create-response-mode",
        choices=("500", "drop"),
        default=fault_defaults.lose_create_response_mode,
        help="how a lost create response looks: a 500 or a dropped connection",
    )
    return parser


def settings_from_args(args: argparse.Namespace) -> EmulatorSettings:
    """Settings from parsed flags (pydantic validates them, e.g. rates within [0, 1])."""
    known_models = EmulatorSettings().known_models
    if args.known_models is not None:
        known_models = None if args.known_models.strip() == "*" else args.known_models
    return EmulatorSettings(
        known_models=known_models,
        state_path=args.state,
        processing_seconds=args.processing_seconds,
        processing_retrieves=args.processing_retrieves,
        cancel_seconds=args.cancel_seconds,
        max_body_bytes=args.max_body_bytes,
        min_cache_tokens=args.min_cache_tokens,
        api_key=args.api_key,
        generation_workers=args.generation_workers,
        generation_min_batch=args.generation_min_batch,
        faults=FaultSettings(
            seed=args.seed,
            errored_rate=args.errored_rate,
            expired_rate=args.expired_rate,
            invalid_answer_rate=args.invalid_answer_rate,
            invalid_kinds=args.invalid_kinds,
            http_error_rate=args.http_error_rate,
            http_error_codes=args.http_error_codes,
            http_error_endpoints=args.http_error_endpoints,
            http_error_first_n=args.http_error_first_n,
            retry_after_seconds=args.retry_after_seconds,
            retry_after_ms=args.retry_after_ms,
            description_break_rate=args.description_break_rate,
            invented_quote_rate=args.invented_quote_rate,
            transient_404_after_create=args.transient_404_after_create,
            cut_results_after=args.cut_results_after,
            cut_results_times=args.cut_results_times,
            lose_create_response_first_n=args.lose_create_response_first_n,
            lose_create_response_mode=args.lose_create_response_mode,
        ),
    )


def main(argv: list[str] | None = None) -> None:
    """Serve until SIGINT/SIGTERM."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        parser.error(str(exc))
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server = EmulatorServer(settings, host=args.host, port=args.port, log_level=args.log_level)
    except OSError as exc:
        parser.exit(1, f"fable-emulator: cannot listen on {args.host}:{args.port}: {exc}\n")
    try:
        server.start()
        print(f"fable-emulator listening on {server.base_url}", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())

"""When is a wait on batches over, and did it succeed? One answer for every waiting path.

The sensor's poke and reschedule paths, the deferred trigger and the one-task operator all ask
the same question after each poll; before this module each answered it a little differently,
and a batch canceled from outside, or one whose every request expired, ended "green" with a
load of zero rows. Here the rules are written once, in plain Python, so each path only polls
and reports:

- every batch ended and every request succeeded -> success;
- some requests errored or expired -> success with a warning, or failure when
  ``fail_on_partial`` (a job that must be complete says so);
- a batch canceled (by anyone: the console, another process) or one in which no request
  succeeded (all expired, all errored) -> failure, unless ``accept_incomplete`` (the user wants
  whatever came back, e.g. to load the part that finished before a deliberate cancel);
- the deadline passed before everything ended -> failure naming the batches still running, which
  the caller cancels (best effort) so they stop billing.

The deadline is a wall-clock epoch (``time.time()``), not a monotonic reading: a deferred wait
is serialized and may resume in another triggerer process, where a monotonic clock means nothing.
By default it is the latest ``expires_at`` of the batches plus a margin: the API ends every
batch by its expiry, so a wait past that point is waiting on something that will not come.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

#: The API ends (expires) a batch 24 h after creation; a little slack covers clock skew and the
#: time the API needs to publish the ended status.
DEFAULT_DEADLINE_MARGIN = 30 * 60.0

COUNT_KEYS = ("processing", "succeeded", "errored", "canceled", "expired")


def summary_from_json(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The few fields a wait needs, from a batch as the API returns it (JSON dict).

    Polls read only these, so thousands of waits cost one small dict per poll, not a full model.
    """
    counts = batch.get("request_counts") or {}
    return {
        "id": batch["id"],
        "processing_status": batch.get("processing_status"),
        "request_counts": {k: int(counts.get(k) or 0) for k in COUNT_KEYS},
        "created_at": batch.get("created_at"),
        "ended_at": batch.get("ended_at"),
        "expires_at": batch.get("expires_at"),
    }


def epoch(value: Any) -> float | None:
    """RFC 3339 text / datetime / number -> epoch seconds (None when absent or unreadable)."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, datetime):
        return value.timestamp()
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def default_deadline(
    summaries: Iterable[Mapping[str, Any]], margin: float = DEFAULT_DEADLINE_MARGIN
) -> float | None:
    """Latest ``expires_at`` of the batches plus ``margin`` (None when no batch says when)."""
    expiries = [e for e in (epoch(s.get("expires_at")) for s in summaries) if e is not None]
    return max(expiries) + margin if expiries else None


@dataclass
class Totals:
    """Request counts summed over the batches, plus how many batches have ended."""

    batches: int = 0
    ended: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNT_KEYS, 0))

    @property
    def requests(self) -> int:
        return sum(self.counts.values())

    @property
    def done_fraction(self) -> float:
        total = self.requests
        return 1.0 if not total else 1.0 - self.counts["processing"] / total

    def describe(self) -> str:
        c = self.counts
        return (
            f"{self.ended}/{self.batches} batches ended; {self.done_fraction:.1%} of {self.requests} "
            f"requests done (processing {c['processing']}, succeeded {c['succeeded']}, errored "
            f"{c['errored']}, canceled {c['canceled']}, expired {c['expired']})"
        )


def totals(summaries: Iterable[Mapping[str, Any]]) -> Totals:
    out = Totals()
    for s in summaries:
        out.batches += 1
        out.ended += s.get("processing_status") == "ended"
        for key in COUNT_KEYS:
            out.counts[key] += int(s["request_counts"].get(key) or 0)
    return out


@dataclass(frozen=True)
class Verdict:
    """The end of a wait: ``ok`` or not, what to tell the user, and what to cancel."""

    ok: bool
    reason: str  # "ended" | "partial" | "incomplete" | "timeout"
    message: str
    to_cancel: tuple[str, ...] = ()


@dataclass(frozen=True)
class TerminalPolicy:
    """The rules above, parameterised by the two choices a user may make.

    :param fail_on_partial: fail when some requests errored or expired (default: succeed, the
        load rejects them with a reason).
    :param accept_incomplete: succeed even when a batch was canceled or no request of a batch
        succeeded (default: fail, because that usually means someone or something stopped the
        job and a "successful" load of nothing would hide it).
    :param known_incomplete: batches that had already ended canceled or expired when a later try
        re-attached to them (the submit lists them in its manifest as ``ended_incomplete``).
        That failure was reported by the earlier try; failing again would leave their records
        stuck for good, because they were never loaded and so never became rejects a
        ``rerun="failed"`` could pick up. They count as partial instead: the load takes what came
        back and rejects the rest as ``canceled``/``expired`` (retryable).
    """

    fail_on_partial: bool = False
    accept_incomplete: bool = False
    known_incomplete: tuple[str, ...] = ()

    def decide(
        self, summaries: Sequence[Mapping[str, Any]], *, now: float, deadline: float | None
    ) -> Verdict | None:
        """The verdict once every batch has ended or the deadline passed; None to keep waiting."""
        pending = [s["id"] for s in summaries if s.get("processing_status") != "ended"]
        if pending:
            if deadline is not None and now >= deadline:
                return Verdict(
                    ok=False,
                    reason="timeout",
                    message=(
                        f"deadline reached with {len(pending)} of {len(summaries)} batches still "
                        f"running: {', '.join(pending)}; they were asked to cancel so they stop "
                        f"billing. {totals(summaries).describe()}"
                    ),
                    to_cancel=tuple(pending),
                )
            return None
        return self._ended(summaries)

    def _ended(self, summaries: Sequence[Mapping[str, Any]]) -> Verdict:
        t = totals(summaries)
        known = set(self.known_incomplete)
        canceled = [s["id"] for s in summaries if s["request_counts"].get("canceled") and s["id"] not in known]
        empty = [s["id"] for s in summaries if not s["request_counts"].get("succeeded") and s["id"] not in known]
        if (canceled or empty) and not self.accept_incomplete:
            parts = []
            if canceled:
                parts.append(f"canceled: {', '.join(canceled)}")
            if empty:
                parts.append(f"no request succeeded: {', '.join(empty)}")
            return Verdict(
                ok=False,
                reason="incomplete",
                message=(
                    f"batches ended incomplete ({'; '.join(parts)}). {t.describe()}. Pass "
                    "accept_incomplete=True to accept what came back and load it."
                ),
            )
        if t.counts["errored"] or t.counts["expired"] or t.counts["canceled"]:
            message = f"batches ended with some requests not answered. {t.describe()}"
            # Known-incomplete batches were reported by an earlier try: only the others decide.
            fresh = totals(s for s in summaries if s["id"] not in known).counts if known else t.counts
            if self.fail_on_partial and (fresh["errored"] or fresh["expired"] or fresh["canceled"]):
                return Verdict(ok=False, reason="partial", message=message + " (fail_on_partial=True)")
            return Verdict(ok=True, reason="partial", message=message)
        return Verdict(ok=True, reason="ended", message=f"all batches ended. {t.describe()}")


class Progress:
    """Rate and expected end of a wait, from successive totals (kept by the polling side)."""

    def __init__(self) -> None:
        self._first: tuple[float, int] | None = None

    def line(self, summaries: Sequence[Mapping[str, Any]], now: float) -> str:
        t = totals(summaries)
        finished = t.requests - t.counts["processing"]
        if self._first is None:
            self._first = (now, finished)
        start, done_then = self._first
        text = t.describe()
        rate = (finished - done_then) / (now - start) if now > start else 0.0
        if rate > 0 and t.counts["processing"]:
            eta = now + t.counts["processing"] / rate
            text += (
                f"; expected end ~{datetime.fromtimestamp(eta).astimezone().isoformat(timespec='seconds')}"
            )
        return text

"""Coalesced status polling: one round of list calls serves every wait of a connection.

A triggerer runs the deferred waits of a whole deployment in one event loop. Polled one by one,
1,000 waits cost 1,000 GETs (and their parsing) per interval; but the API's list endpoint
(``GET /v1/messages/batches?limit=1000``, newest first) returns full batch objects, status and
request counts included, a thousand at a time. So the waits of one connection on one loop do not
poll themselves: each registers a :class:`Watch` with the connection's :class:`BatchPoller` and
awaits its next turn; the poller runs *rounds*, and one round reads the statuses of every due
wait with as few list pages as it takes:

- paging (``after_id``) stops as soon as every watched id was seen, when a page reaches batches
  created before the oldest watched one (nothing older can be watched), when there are no more
  pages, or after a page budget (a few pages beyond what the watched ids could fill);
- an id the pages did not show (just created and not listed yet, in another workspace, deleted,
  or behind the budget) falls back to a plain retrieve, which keeps the per-batch semantics:
  a transient 404 right after create, 429/5xx errors counted by the wait that owns the batch;
- a round with fewer than ``LIST_MIN_IDS`` ids (one trigger on one batch) only retrieves: a page
  of other batches would cost more than it saves;
- a failed list call (429, 5xx, network) fails the round for every wait in it, which each count
  as one failed poll and retry at their next turn, exactly as a failed retrieve would; a final
  4xx from the list endpoint (refused for this key, or a page size it no longer takes) switches
  the connection to plain retrieves instead of failing waits that retrieves would serve.

Timing. A watch is due ``poll_interval`` (+-``jitter``) after its previous turn, and a round takes
every watch due within the jitter window after the earliest one, so waits with the same interval
fall into one round per interval instead of spreading over it. A new watch joins the round
already planned if that comes within its interval (1,000 waits deferred in the same instant make
one first call), and otherwise picks a random point in its first interval, as before.

Event-loop cost. A trigger's step is small (register, await a future); the poller resolves the
waits' futures in chunks of ``DISPATCH_CHUNK`` with a yield in between, so a round that wakes
10,000 waits never runs them in one loop iteration. A list page of 1,000 batches (~0.4 MB) is
parsed on the loop: the parser holds the GIL whether it runs here or in a thread, and with
orjson it takes ~3 ms (bench/triggerer.py measures the worst loop lag with it).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

from airflow_provider_fable.core.errors import FableError
from airflow_provider_fable.core.terminal import epoch, summary_from_json
from airflow_provider_fable.exceptions import ConnectionSetupError as ConnectionSetupError
from airflow_provider_fable.hooks.shared_client import POOL_SIZE, shared_client

log = logging.getLogger(__name__)

#: Fewest distinct ids in a round that are read by listing; fewer are retrieved one by one.
LIST_MIN_IDS = 3
#: The API's largest page.
LIST_PAGE_MAX = 1000
#: Smallest page asked for (a few recent batches of other jobs rarely push ours off it).
LIST_PAGE_MIN = 100
#: Pages a round may read beyond what its watched ids could fill before falling back to retrieves.
EXTRA_PAGES = 2
#: Waits woken per loop iteration when a round ends.
DISPATCH_CHUNK = 32


class Watch:
    """One wait's place in its connection's rounds (created by :meth:`BatchPoller.watch`)."""

    __slots__ = ("poller", "interval", "jitter", "due", "ids", "future", "__weakref__")

    def __init__(self, poller: BatchPoller, interval: float, jitter: float, due: float) -> None:
        self.poller = poller
        self.interval = interval
        self.jitter = jitter
        self.due = due
        self.ids: tuple[str, ...] = ()
        self.future: asyncio.Future[dict[str, dict[str, Any]]] | None = None

    @property
    def window(self) -> float:
        """How early a round may serve this watch (its jitter on both sides)."""
        return 2.0 * self.jitter * self.interval

    async def poll(self, batch_ids: Iterable[str]) -> Mapping[str, dict[str, Any]]:
        """Wait for this watch's next turn; fresh summaries of ``batch_ids`` by id.

        The mapping is the round's, shared by every wait in it: read your ids, never modify it
        (or the summaries). Raises the ``FableError`` of the first of its batches whose read
        failed (the whole poll counts as failed, as a failed retrieve did), or
        :class:`ConnectionSetupError`.
        """
        ids = tuple(batch_ids)
        if ids != self.ids:
            self.ids = ids  # unchanged between most turns: no new long-lived object per poll
        future = self.future = asyncio.get_running_loop().create_future()
        self.poller._arm(self)
        try:
            return await future
        finally:
            self.future = None

    def close(self) -> None:
        """Leave the rounds (the wait ended or was cancelled)."""
        self.poller._watches.discard(self)
        self.poller._kick.set()  # an idle runner with nothing left to watch ends


class BatchPoller:
    """The rounds of one connection on one event loop (see the module docstring)."""

    def __init__(self, conn_id: str) -> None:
        self.conn_id = conn_id
        self._watches: set[Watch] = set()
        self._wake_at: float | None = None  # when the runner plans its next round
        self._kick = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._created: dict[str, float] = {}  # batch id -> created_at (epoch), learned from reads
        self._known: dict[str, dict[str, Any]] = {}  # batch id -> its last summary
        #: Set when the list endpoint answered with a final 4xx: only retrieves from then on.
        self.list_refused = False
        #: Counters for tests and the benchmark: rounds, list pages, retrieves, polls served.
        self.stats = {"rounds": 0, "list_calls": 0, "retrieves": 0, "polls": 0}

    # ------------------------------------------------------------------ registration
    def watch(self, interval: float, jitter: float = 0.1) -> Watch:
        loop = asyncio.get_running_loop()
        now = loop.time()
        interval = max(float(interval), 0.0)
        planned = self._wake_at
        if planned is not None and now <= planned <= now + interval:
            due = planned  # join the round already planned: waits started together poll together
        else:
            due = now + random.uniform(0.0, interval)
        watch = Watch(self, interval, min(max(float(jitter), 0.0), 0.9), due)
        self._watches.add(watch)
        return watch

    def _arm(self, watch: Watch) -> None:
        self._watches.add(watch)
        if self._wake_at is None or watch.due < self._wake_at:
            self._wake_at = watch.due
            self._kick.set()
        if self._runner is None or self._runner.done():
            self._runner = asyncio.ensure_future(self._run())

    # ------------------------------------------------------------------ the rounds
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._watches:
            waiting = [w for w in self._watches if w.future is not None and not w.future.done()]
            if not waiting:
                self._wake_at = None
                self._kick.clear()
                await self._kick.wait()
                continue
            first = min(w.due for w in waiting)
            now = loop.time()
            if first > now:
                self._wake_at = first
                self._kick.clear()
                try:
                    await asyncio.wait_for(self._kick.wait(), first - now)
                except asyncio.TimeoutError:
                    pass
                continue
            due = [w for w in waiting if w.due <= now + w.window]
            self._wake_at = None
            try:
                await self._round(due)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a bug here must fail the waits, not hang them
                error = FableError(f"status poll failed unexpectedly: {type(exc).__name__}: {exc}")
                for w in due:
                    if w.future is not None and not w.future.done():
                        w.future.set_exception(error)
        self._wake_at = None

    async def _round(self, watches: list[Watch]) -> None:
        self.stats["rounds"] += 1
        ids = list(dict.fromkeys(b for w in watches for b in w.ids))
        if len(self._known) > 2 * len(self._watches) + LIST_PAGE_MAX:
            # What was learned about batches nobody waits on any more (a triggerer runs for months).
            watched = {b for w in self._watches for b in w.ids}
            self._created = {b: t for b, t in self._created.items() if b in watched}
            self._known = {b: v for b, v in self._known.items() if b in watched}
        try:
            client = await shared_client(self.conn_id)
        except FableError as exc:
            results: dict[str, Any] = dict.fromkeys(ids, ConnectionSetupError(str(exc)))
        else:
            results = await self._read(client, ids)
        now = asyncio.get_running_loop().time()
        for n, w in enumerate(watches, 1):
            w.due = now + w.interval * random.uniform(1.0 - w.jitter, 1.0 + w.jitter)
            future = w.future
            if future is None or future.done():
                continue  # the wait was cancelled meanwhile
            failed = next((results[b] for b in w.ids if isinstance(results.get(b), Exception)), None)
            if failed is not None:
                future.set_exception(failed)
            else:
                future.set_result(results)
            self.stats["polls"] += 1
            if n % DISPATCH_CHUNK == 0:
                await asyncio.sleep(0)  # let the woken waits (and everything else) run

    async def _read(self, client: Any, ids: list[str]) -> dict[str, Any]:
        """Summary (or the FableError of its read) for every id."""
        out: dict[str, Any] = {}
        if len(ids) >= LIST_MIN_IDS and not self.list_refused:
            try:
                out.update(await self._list(client, ids))
            except FableError as exc:
                if getattr(exc, "status_code", None) not in (400, 403, 404, 405, 422):
                    return dict.fromkeys(ids, exc)  # 429/5xx/network: a failed poll for each wait
                # The endpoint (or its page size) is refused for this key/host: the waits must
                # not fail for a shortcut, so this connection retrieves from now on.
                self.list_refused = True
                log.warning("Listing batches refused (%s); polling each batch on its own from now on", exc)
        missing = [b for b in ids if b not in out]
        if missing:
            gate = asyncio.Semaphore(POOL_SIZE)

            async def one(batch_id: str) -> None:
                async with gate:
                    self.stats["retrieves"] += 1
                    try:
                        out[batch_id] = self._learn(await client.poll(batch_id))
                    except FableError as exc:
                        out[batch_id] = exc

            await asyncio.gather(*(one(b) for b in missing))
        return out

    async def _list(self, client: Any, ids: list[str]) -> dict[str, dict[str, Any]]:
        wanted = set(ids)
        found: dict[str, dict[str, Any]] = {}
        known = [self._created.get(b) for b in ids]
        oldest = None if None in known else min(known)  # type: ignore[type-var]
        limit = min(LIST_PAGE_MAX, max(LIST_PAGE_MIN, 2 * len(wanted)))
        budget = math.ceil(len(wanted) / limit) + EXTRA_PAGES
        after: str | None = None
        for _ in range(budget):
            self.stats["list_calls"] += 1
            page = await client.list_page(limit, after)
            data = page["data"]
            for item in data:
                if isinstance(item, dict) and item.get("id") in wanted:
                    try:
                        found[item["id"]] = self._learn(summary_from_json(item))
                    except (KeyError, TypeError, ValueError, AttributeError):
                        continue  # unreadable here: its own retrieve will say why
            if len(found) == len(wanted) or not page.get("has_more") or not data:
                break
            last_created = epoch(data[-1].get("created_at")) if isinstance(data[-1], dict) else None
            if oldest is not None and last_created is not None and last_created < oldest:
                break
            after = page.get("last_id") or data[-1].get("id")
        return found

    def _learn(self, summary: dict[str, Any]) -> dict[str, Any]:
        """The summary to hand out: the previous object when nothing changed.

        Thousands of waits keep their batches' summaries for a whole interval; handing out a new
        dict every poll made each round promote tens of thousands of objects to the oldest
        generation and triggered full garbage collections (~0.3 s pauses of the loop with
        10,000 waits in a process that imports Airflow). An unchanged status costs nothing kept.
        """
        batch_id = summary["id"]
        previous = self._known.get(batch_id)
        if previous == summary:
            return previous
        self._known[batch_id] = summary
        if batch_id not in self._created:
            created = epoch(summary.get("created_at"))
            if created is not None:
                self._created[batch_id] = created
        return summary


_pollers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, BatchPoller]] = (
    weakref.WeakKeyDictionary()
)


def batch_poller(conn_id: str) -> BatchPoller:
    """The running loop's poller for ``conn_id`` (created on first use; no I/O here)."""
    loop = asyncio.get_running_loop()
    pollers = _pollers.get(loop)
    if pollers is None:
        pollers = _pollers[loop] = {}
    poller = pollers.get(conn_id)
    if poller is None:
        poller = pollers[conn_id] = BatchPoller(conn_id)
    return poller

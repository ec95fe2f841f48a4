"""The submit's duplicate custom_id check, in about 12 bytes a record instead of a dict entry.

Why: two records with the same custom_id must be refused before anything is paid for, so every
custom_id of a run has to be remembered until the last record is read. A ``dict`` of
custom_id -> record id costs ~80 bytes a record (two strings and a slot): ~800 MB for a 10M-record
submit, over the task's memory budget. Here a native custom_id (one that *is* the record's id
text, which is every id fitting the API's rule) is kept as two hashes, 64 bits from Python's
``hash`` (cached on the string) and 32 from ``crc32``: 96 bits, the same margin the id codec
already relies on (``core.ids``: 96-bit digests; a false match among 10M ids has odds of about
10^-15). Pending ids are checked a chunk at a time with numpy against sorted runs merged as they
grow (an LSM of a few runs), so the cost per record stays a hash and two appends.

For native ids equal custom_ids mean equal record ids, so a match is a true duplicate and the
error can name the record from the string still held in the pending chunk. Custom_ids starting
with ``enc-`` (encoded ids, or a native id that happens to look encoded) keep the exact map: a
match there may be two *different* records (a collision), and the error must name both.

The check runs at chunk boundaries and at the end, so a duplicate is reported up to one chunk
after its second occurrence was read: still before the first create (the submit spools every
request first), and the error names the second record and its position, as before.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from airflow_provider_fable.core import ids
from airflow_provider_fable.core.errors import RecordError

#: Native ids checked together; the strings of one chunk are all that is held as objects.
CHUNK = 1 << 16
#: Largest merged run (4M ids, 48 MB): past it runs are kept side by side and each searched.
MAX_RUN = 1 << 22

_Run = tuple["np.ndarray[tuple[int], np.dtype[np.int64]]", "np.ndarray[tuple[int], np.dtype[np.uint32]]"]


class UniqueIds:
    """Remembers a run's custom_ids; ``add`` and ``finish`` raise ``RecordError`` on a duplicate."""

    def __init__(self, chunk: int = CHUNK) -> None:
        self._chunk = chunk
        self._ids: list[str] = []  # pending native custom_ids (= record id texts)
        self._positions: list[int] = []
        self._runs: list[_Run] = []  # sorted 64-bit hashes with their crc32s, largest first
        self._encoded: dict[str, str] = {}  # "enc-..." custom_id -> record id text

    def add(self, custom_id: str, position: int, record_id: Any) -> None:
        """One request's custom_id at source ``position``; ``record_id`` is the record's raw id
        (turned into text only for ``enc-`` custom_ids, rare unless the ids need encoding)."""
        if custom_id.startswith(ids.ENCODED_PREFIX):
            real = ids.record_id_text(record_id)
            earlier = self._encoded.get(custom_id)
            if earlier is None:
                self._encoded[custom_id] = real
                return
            if earlier == real:
                raise RecordError(real, "custom_id.duplicate", "two source records share this id", position)
            raise RecordError(
                real,
                "custom_id.collision",
                f"its custom_id {custom_id!r} is also the custom_id of record {earlier!r}",
                position,
            )
        self._ids.append(custom_id)
        self._positions.append(position)
        if len(self._ids) >= self._chunk:
            self._check()

    def finish(self) -> None:
        """Check the last pending ids (call once the source is exhausted)."""
        if self._ids:
            self._check()

    @property
    def nbytes(self) -> int:
        """Bytes held by the sorted runs (what grows with the number of records)."""
        return sum(h.nbytes + c.nbytes for h, c in self._runs)

    def _check(self) -> None:
        pending, positions = self._ids, self._positions
        self._ids, self._positions = [], []
        n = len(pending)
        h = np.fromiter(map(hash, pending), dtype=np.int64, count=n)
        c = np.fromiter((zlib.crc32(x.encode("utf-8", "surrogatepass")) for x in pending), np.uint32, n)
        order = np.argsort(h, kind="stable")
        hs, cs = h[order], c[order]
        second: list[int] = []  # indexes into pending of ids seen before
        same = np.flatnonzero((hs[1:] == hs[:-1]) & (cs[1:] == cs[:-1]))
        for j in same.tolist():  # within the chunk: both strings are here, compared exactly
            first, later = int(order[j]), int(order[j + 1])
            if pending[first] == pending[later]:
                second.append(later)
        for run_h, run_c in self._runs:
            at = np.searchsorted(run_h, hs)
            inside = at < len(run_h)
            match = np.zeros(n, dtype=bool)
            match[inside] = run_h[at[inside]] == hs[inside]
            for j in np.flatnonzero(match).tolist():
                lo, hi = int(at[j]), int(np.searchsorted(run_h, hs[j], side="right"))
                if (run_c[lo:hi] == cs[j]).any():
                    second.append(int(order[j]))
        if second:
            index = min(second, key=lambda i: positions[i])
            raise RecordError(
                pending[index], "custom_id.duplicate", "two source records share this id", positions[index]
            )
        self._runs.append((hs, cs))
        # Merge while the newest run is as big as the one before it: a few runs of doubling size,
        # so each chunk is searched in O(log N) runs and every hash is moved O(log N) times. Runs
        # stop growing at MAX_RUN: a merge holds both inputs and its output at once, and merging
        # everything into one run would double the check's memory at the moment of each merge.
        while (
            len(self._runs) > 1
            and len(self._runs[-2][0]) <= len(self._runs[-1][0])
            and len(self._runs[-2][0]) + len(self._runs[-1][0]) <= MAX_RUN
        ):
            (ah, ac), (bh, bc) = self._runs[-2], self._runs.pop()
            at = np.searchsorted(ah, bh)
            self._runs[-1] = (np.insert(ah, at, bh), np.insert(ac, at, bc))

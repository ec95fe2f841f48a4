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
with ``enc-`` (encoded ids, or a native id that happens to look encoded) are checked the same
way, by hash; a match there may be two *different* records (a collision), so the first record
given each such custom_id is kept (``core.id_map``, spilled to a scratch file past 100k) to
name both. Only a match reads that map: no look-up per record.

The check runs at chunk boundaries and at the end, so a duplicate is reported up to one chunk
after its second occurrence was read: still before the first create (the submit spools every
request first), and the error names the second record and its position, as before.

Past ``SPILL_AFTER`` ids (1M, 12 MB of runs) the runs stop growing, so the task's memory is the
same at 10M records as at 1M: every later chunk is still checked at once against itself and the
runs in memory, then written to one of ``BUCKETS`` temporary files by its hash (the id text and,
beside it, the position). The spilled ids are checked against each other bucket by bucket when
the source is exhausted (a set over the texts of one bucket: ~1/64 of them at a time, exact), or
as soon as a chunk finds a duplicate, so the error still names the *earliest* second occurrence.
The files live in a private temporary directory of this task and are removed when the check ends
(nothing is shared through the disk between tasks).
"""

from __future__ import annotations

import os
import tempfile
import zlib
from typing import Any

import numpy as np

from airflow_provider_fable.core import ids
from airflow_provider_fable.core.errors import RecordError
from airflow_provider_fable.core.id_map import IdMap

#: Native ids checked together; the strings of one chunk are all that is held as objects.
CHUNK = 1 << 16
#: Largest merged run (4M ids, 48 MB): past it runs are kept side by side and each searched
#: (only reached when ``SPILL_AFTER`` is raised above it).
MAX_RUN = 1 << 22
#: Ids kept as runs in memory; later chunks are spilled to bucket files (see the module doc).
SPILL_AFTER = 1 << 20
#: Bucket files of the spilled ids (each checked whole at the end: ~1/BUCKETS of them at a time).
BUCKETS = 64

_Run = tuple["np.ndarray[tuple[int], np.dtype[np.int64]]", "np.ndarray[tuple[int], np.dtype[np.uint32]]"]


class UniqueIds:
    """Remembers a run's custom_ids; ``add`` and ``finish`` raise ``RecordError`` on a duplicate."""

    def __init__(self, chunk: int | None = None) -> None:
        self._chunk = chunk or CHUNK
        self._ids: list[str] = []  # pending custom_ids (a native one is the record id text)
        self._positions: list[int] = []
        self._runs: list[_Run] = []  # sorted 64-bit hashes with their crc32s, largest first
        self._held = 0  # ids in the runs
        self._spill: tempfile.TemporaryDirectory[str] | None = None  # bucket files, once past SPILL_AFTER
        # "enc-..." custom_id -> the first record id text given it (spilled past 100k), and the
        # record texts of the pending chunk's enc- ids by index
        self._encoded = IdMap(first_wins=True)
        self._reals: dict[int, str] = {}

    def add(self, custom_id: str, position: int, record_id: Any) -> None:
        """One request's custom_id at source ``position``; ``record_id`` is the record's raw id
        (turned into text only for ``enc-`` custom_ids, rare unless the ids need encoding)."""
        if custom_id.startswith(ids.ENCODED_PREFIX):
            # Checked by hash with the native ids; the map (first record per custom_id) and the
            # chunk's record texts only serve to name the records of a match.
            real = ids.record_id_text(record_id)
            self._encoded[custom_id] = real
            self._reals[len(self._ids)] = real
        self._ids.append(custom_id)
        self._positions.append(position)
        if len(self._ids) >= self._chunk:
            self._check()

    def finish(self) -> None:
        """Check the last pending ids and the spilled ones (call once the source is exhausted)."""
        try:
            if self._ids:
                self._check()
            if self._spill is not None:
                earliest = self._spilled_duplicate()
                if earliest is not None:
                    raise self._duplicate(earliest[1], earliest[0])
        finally:
            self.close()

    def close(self) -> None:
        """Remove the bucket files, if any (``finish`` does; for a source abandoned half way)."""
        self._encoded.close()
        if self._spill is not None:
            self._spill.cleanup()
            self._spill = None

    @property
    def spilled(self) -> bool:
        """Whether ids went to bucket files (the run had more than ``SPILL_AFTER`` ids)."""
        return self._spill is not None

    @property
    def nbytes(self) -> int:
        """Bytes held by the sorted runs (what grows with the number of records)."""
        return sum(h.nbytes + c.nbytes for h, c in self._runs)

    def _duplicate(self, custom_id: str, position: int, real: str | None = None) -> RecordError:
        """The error for the second occurrence of ``custom_id`` at ``position``.

        A native custom_id is the record's id. An encoded one names the first record given it
        (kept in the map) and this one (``real``, when the pending chunk still has its text): the
        same id twice is a duplicate, two ids with one encoding a collision (odds ~10^-15 at 10M).
        """
        if not custom_id.startswith(ids.ENCODED_PREFIX):
            return RecordError(custom_id, "custom_id.duplicate", "two source records share this id", position)
        earlier = self._encoded.get(custom_id)
        if real is not None and earlier is not None and earlier != real:
            return RecordError(
                real,
                "custom_id.collision",
                f"its custom_id {custom_id!r} is also the custom_id of record {earlier!r}",
                position,
            )
        if real is None:  # read back from the bucket files: only the custom_id is there
            message = "two source records share this custom_id (the same id, or two ids encoded alike)"
            return RecordError(earlier or custom_id, "custom_id.duplicate", message, position)
        return RecordError(real, "custom_id.duplicate", "two source records share this id", position)

    def _check(self) -> None:
        pending, positions, reals = self._ids, self._positions, self._reals
        self._ids, self._positions, self._reals = [], [], {}
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
        if self._spill is not None or self._held >= SPILL_AFTER:
            # Past the memory budget: the chunk goes to the bucket files, where the spilled ids
            # are checked against each other at the end, or now if this chunk found a duplicate
            # (a spilled pair may be the earlier one: the error names the earliest).
            self._write_buckets(pending, positions, h)
            if second:
                index = min(second, key=lambda i: positions[i])
                earliest = self._spilled_duplicate()
                if earliest is not None and earliest[0] < positions[index]:
                    error = self._duplicate(earliest[1], earliest[0])
                else:
                    error = self._duplicate(pending[index], positions[index], reals.get(index))
                self.close()
                raise error
            return
        if second:
            index = min(second, key=lambda i: positions[i])
            raise self._duplicate(pending[index], positions[index], reals.get(index))
        self._runs.append((hs, cs))
        self._held += n
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

    def _write_buckets(
        self, pending: list[str], positions: list[int], h: np.ndarray[tuple[int], np.dtype[np.int64]]
    ) -> None:
        """Append a checked chunk to the bucket files: each custom_id (it fits the API's
        ``[a-zA-Z0-9_-]``, so a newline ends it) to ``<b>.ids`` and its position to ``<b>.pos``."""
        if self._spill is None:
            self._spill = tempfile.TemporaryDirectory(prefix="fable-unique-ids-")
        bucket = (h.view(np.uint64) % np.uint64(BUCKETS)).astype(np.intp)
        order = np.argsort(bucket, kind="stable")
        bounds = np.searchsorted(bucket[order], np.arange(BUCKETS + 1))
        pos = np.asarray(positions, dtype=np.int64)[order]
        members = order.tolist()
        for b in range(BUCKETS):
            lo, hi = int(bounds[b]), int(bounds[b + 1])
            if lo == hi:
                continue
            stem = os.path.join(self._spill.name, str(b))
            with open(stem + ".ids", "ab") as f:
                f.write(
                    ("\n".join([pending[i] for i in members[lo:hi]]) + "\n").encode("utf-8", "surrogatepass")
                )
            with open(stem + ".pos", "ab") as f:
                pos[lo:hi].tofile(f)

    def _spilled_duplicate(self) -> tuple[int, str] | None:
        """(position, id) of the earliest second occurrence among the spilled ids, or None.

        One bucket at a time: equal ids hash alike, so a duplicate's two occurrences share a
        bucket. A bucket without one (nearly always) costs a split and a set of its texts."""
        assert self._spill is not None
        earliest: tuple[int, str] | None = None
        for b in range(BUCKETS):
            stem = os.path.join(self._spill.name, str(b))
            if not os.path.exists(stem + ".ids"):
                continue
            with open(stem + ".ids", "rb") as f:
                texts = f.read().split(b"\n")[:-1]
            if len(set(texts)) == len(texts):
                continue
            positions = np.fromfile(stem + ".pos", dtype=np.int64)
            first_seen: dict[bytes, int] = {}
            for i, text in enumerate(texts):
                if text in first_seen:
                    # A later line of a bucket is a later position: files are appended in order.
                    found = (int(positions[i]), text.decode("utf-8", "surrogatepass"))
                    if earliest is None or found < earliest:
                        earliest = found
                    break
                first_seen[text] = i
        return earliest

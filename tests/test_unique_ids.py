"""The submit's compact duplicate check (core.unique_ids) against the exact dict it replaced."""

from __future__ import annotations

import random

import pytest

from airflow_provider_fable.core import ids
from airflow_provider_fable.core.errors import RecordError
from airflow_provider_fable.core.unique_ids import UniqueIds


def _feed(guard: UniqueIds, custom_ids: list[str]) -> None:
    for position, custom_id in enumerate(custom_ids, 1):
        guard.add(custom_id, position, custom_id)
    guard.finish()


@pytest.mark.parametrize("chunk", [1, 2, 7, 64, 1 << 16])
def test_distinct_ids_pass_and_every_duplicate_is_found_at_its_second_position(chunk):
    rng = random.Random(chunk)
    distinct = [f"T{i:07d}" for i in range(3000)]
    _feed(UniqueIds(chunk), distinct)  # no false match
    for _ in range(20):
        first, second = sorted(rng.sample(range(len(distinct)), 2))
        custom_ids = list(distinct)
        custom_ids[second] = custom_ids[first]
        guard = UniqueIds(chunk)
        with pytest.raises(RecordError) as info:
            _feed(guard, custom_ids)
        assert info.value.rule == "custom_id.duplicate"
        assert info.value.record_id == custom_ids[first]
        assert info.value.position == second + 1  # the second occurrence, 1-based as in the source


def test_the_earliest_duplicate_of_a_chunk_is_the_one_reported():
    custom_ids = ["a", "b", "c", "d", "c", "a"]
    with pytest.raises(RecordError) as info:
        _feed(UniqueIds(64), custom_ids)
    assert (info.value.record_id, info.value.position) == ("c", 5)


def test_encoded_ids_keep_the_exact_map_and_name_both_records_of_a_collision():
    encoded = ids.encode("ZD#123")
    guard = UniqueIds(4)
    guard.add(encoded, 1, "ZD#123")
    with pytest.raises(RecordError, match=r"custom_id.collision.*'ZD#123'"):
        guard.add(encoded, 2, encoded)  # a native id that looks encoded
    guard = UniqueIds(4)
    guard.add(encoded, 1, "ZD#123")
    with pytest.raises(RecordError, match="custom_id.duplicate"):
        guard.add(encoded, 2, "ZD#123")


def test_memory_is_the_runs_of_hashes_not_the_strings():
    guard = UniqueIds(1000)
    _feed(guard, [f"record-{i}" for i in range(10_000)])
    assert guard.nbytes == 12 * 10_000


def test_runs_stop_merging_at_the_cap_and_duplicates_across_capped_runs_are_found(monkeypatch):
    import airflow_provider_fable.core.unique_ids as unique_ids

    monkeypatch.setattr(unique_ids, "MAX_RUN", 40)
    guard = UniqueIds(10)
    for position in range(1, 201):
        guard.add(f"id{position}", position, None)
    assert max(len(h) for h, _ in guard._runs) <= 40 and len(guard._runs) >= 5
    with pytest.raises(RecordError) as info:
        guard.add("id3", 201, None)  # in the first, long-closed run
        guard.finish()
    assert (info.value.record_id, info.value.position) == ("id3", 201)

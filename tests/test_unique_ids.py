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
    with pytest.raises(RecordError, match=r"custom_id.collision.*'ZD#123'") as info:
        guard.add(encoded, 2, encoded)  # a native id that looks encoded
        guard.finish()
    assert (info.value.record_id, info.value.position) == (encoded, 2)
    guard = UniqueIds(4)
    guard.add(encoded, 1, "ZD#123")
    with pytest.raises(RecordError, match="custom_id.duplicate") as info:
        guard.add(encoded, 2, "ZD#123")
        guard.finish()
    assert (info.value.record_id, info.value.position) == ("ZD#123", 2)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_encoded_ids_are_checked_by_hash_and_named_from_the_spilled_map(monkeypatch, chunk):
    import airflow_provider_fable.core.id_map as id_map
    import airflow_provider_fable.core.unique_ids as unique_ids

    monkeypatch.setattr(id_map, "IN_MEMORY", 5)  # the first-record map goes to its file early
    monkeypatch.setattr(unique_ids, "SPILL_AFTER", 40)  # and later chunks to the bucket files
    real = [f"ZD#{i}" for i in range(300)]
    encoded = [ids.encode(r) for r in real]
    for first in (2, 10, 120, 299):
        guard = UniqueIds(chunk)
        with pytest.raises(RecordError) as info:
            for position, custom_id in enumerate(encoded, 1):
                guard.add(custom_id, position, real[position - 1])
            guard.add(encoded[first], 301, real[first])  # the same record again
            guard.finish()
        assert info.value.rule == "custom_id.duplicate"
        assert (info.value.record_id, info.value.position) == (real[first], 301)
    guard = UniqueIds(chunk)
    for position, custom_id in enumerate(encoded, 1):
        guard.add(custom_id, position, real[position - 1])
    guard.finish()  # distinct: no false match


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


@pytest.fixture
def spill_early(monkeypatch):
    """Runs stop at 50 ids: everything after goes through the bucket files (as past 1M ids)."""
    import airflow_provider_fable.core.unique_ids as unique_ids

    monkeypatch.setattr(unique_ids, "SPILL_AFTER", 50)
    monkeypatch.setattr(unique_ids, "BUCKETS", 4)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_spilled_ids_find_every_duplicate_at_its_second_position(spill_early, chunk):
    rng = random.Random(chunk)
    distinct = [f"T{i:07d}" for i in range(1500)]
    guard = UniqueIds(chunk)
    _feed(guard, distinct)
    assert guard.nbytes <= 12 * (50 + chunk)  # memory stopped growing at the spill point
    pairs = [(3, 20), (10, 400), (600, 1400), (1498, 1499)]  # memory/memory .. spilled/spilled
    pairs += [tuple(sorted(rng.sample(range(len(distinct)), 2))) for _ in range(15)]
    for first, second in pairs:
        custom_ids = list(distinct)
        custom_ids[second] = custom_ids[first]
        with pytest.raises(RecordError) as info:
            _feed(UniqueIds(chunk), custom_ids)
        assert info.value.rule == "custom_id.duplicate"
        assert (info.value.record_id, info.value.position) == (custom_ids[first], second + 1)


def test_a_spilled_pair_read_earlier_is_reported_before_a_later_duplicate_of_a_run_id(spill_early):
    custom_ids = [f"id{i}" for i in range(1, 401)]
    custom_ids[299] = custom_ids[199]  # both spilled: second occurrence at position 300
    custom_ids[349] = custom_ids[9]  # first one held in the runs: found when its chunk is checked
    with pytest.raises(RecordError) as info:
        _feed(UniqueIds(64), custom_ids)
    assert (info.value.record_id, info.value.position) == ("id200", 300)


def test_bucket_files_are_removed_when_the_check_ends_or_is_abandoned(spill_early, monkeypatch, tmp_path):
    import tempfile

    from pydantic import BaseModel

    import airflow_provider_fable.core.unique_ids as unique_ids
    from airflow_provider_fable.core.job import BatchJob
    from airflow_provider_fable.core.requests import build_requests

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # this test's own temp folder
    monkeypatch.setattr(unique_ids, "CHUNK", 10)
    guard = UniqueIds(10)
    for position in range(1, 200):
        guard.add(f"r{position}", position, None)
    assert guard.spilled and any(tmp_path.glob("fable-unique-ids-*/*.ids"))
    guard.finish()
    assert not guard.spilled and not any(tmp_path.iterdir())

    class Out(BaseModel):
        label: str

    job = BatchJob(prompt_template="{text}", output_model=Out)
    requests = build_requests(job, ({"id": f"r{i}", "text": "x"} for i in range(500)))
    for _ in range(300):
        next(requests)
    assert any(tmp_path.glob("fable-unique-ids-*/*.ids"))
    requests.close()  # the submit stopped half way (an error elsewhere)
    assert not any(tmp_path.iterdir())

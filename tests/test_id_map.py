"""The submit's encoded-id map (core.id_map): a dict in memory, then a SQLite scratch file."""

from __future__ import annotations

import tempfile

from airflow_provider_fable.core.id_map import IdMap


def test_pairs_past_the_memory_limit_are_read_back_from_the_file(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ids = IdMap(in_memory=16)
    expected = {f"enc-{i:04d}": f"record #{i} ü" for i in range(1000)}
    for key, value in expected.items():
        ids[key] = value
    ids["enc-0003"] = "replaced"  # a key set again: the newest value wins, wherever the old one is
    expected["enc-0003"] = "replaced"
    assert ids.spilled and any(tmp_path.glob("fable-id-map-*/ids.sqlite"))
    assert all(ids.get(key) == value for key, value in expected.items())
    assert ids.get("enc-9999") is None and ids.get("enc-9999", "dflt") == "dflt"
    assert "enc-0500" in ids and "enc-9999" not in ids
    assert len(ids) == 1000
    ids.close()
    assert not any(tmp_path.iterdir()) and ids.get("enc-0001") is None


def test_a_small_map_stays_in_memory():
    ids = IdMap(in_memory=16)
    for i in range(15):
        ids[f"k{i}"] = f"v{i}"
    assert not ids.spilled and len(ids) == 15 and ids.get("k7") == "v7"


def test_get_many_reads_memory_and_file_alike():
    ids = IdMap(in_memory=10)
    for i in range(2000):
        ids[f"k{i}"] = f"v{i}"
    wanted = [f"k{i}" for i in range(0, 2000, 3)] + ["absent"]
    assert ids.get_many(wanted) == {k: "v" + k[1:] for k in wanted if k != "absent"}
    ids.close()


def test_first_wins_keeps_the_first_value_wherever_it_is():
    ids = IdMap(in_memory=4, first_wins=True)
    for i in range(20):
        ids[f"k{i}"] = "first"
    for i in range(20):
        ids[f"k{i}"] = "second"  # spilled keys and keys still in memory alike
    assert ids.spilled and all(ids.get(f"k{i}") == "first" for i in range(20))
    assert ids.get_many(["k0", "k19", "zz"]) == {"k0": "first", "k19": "first"}
    ids.close()

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

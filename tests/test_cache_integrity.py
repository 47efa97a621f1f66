"""Cache integrity (issue 15 point 3): every cached volume and augment tensor carries the sha256 recorded
when it was written; a truncated file, another case's array copied over it, or an unreadable one is rebuilt
from its source when it is read for use (and the stage's record says so); one whose source is gone is a
per-case rejection with code ``cache_lost``, on every rerun, never a crash."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.augment.stage import read_index, run_augment
from pipeline.config import load_config
from pipeline.ingest.stage import read_manifest, run_ingest
from pipeline.ingest.volume_cache import CacheFault, load_volume
from pipeline.ops.promotion import model_inputs
from pipeline.train.data import load_split
from tests.conftest import make_dataset, write_config


@pytest.fixture(autouse=True)
def fixed_key(monkeypatch) -> None:
    monkeypatch.setenv("MEDTL_TEST_KEY", "medtl-test-key-0123456789abcdef")


@pytest.fixture
def ingested(tmp_path: Path):
    make_dataset(tmp_path, n_patients=12)
    cfg = load_config(
        write_config(
            tmp_path,
            deid={"key_env": "MEDTL_TEST_KEY"},
            augment={"preview": 0},
            split={"val": 0.25, "calibration": 0.2, "test": 0.25},
        )
    )
    ws = tmp_path / "ws"
    out = ws / "ingest" / "a"
    out.mkdir(parents=True)
    run_ingest(cfg, out, ws)
    return cfg, ws, out


def _augment(cfg, ws: Path, ingest_dir: Path, name: str) -> Path:
    out = ws / "augment" / name
    out.mkdir(parents=True)
    run_augment(cfg, ingest_dir, out, ws)
    return out


def _vol(ws: Path, row: dict[str, str]) -> Path:
    return ws / "cache" / "volumes" / row["volume"]


def _source_of(ws: Path, ingest_dir: Path, case_id: str) -> list[str]:
    priv = ws / "private" / "ingest" / ingest_dir.name / "source_map.csv"
    with open(priv, newline="") as fh:
        return next(r["files"].split(";") for r in csv.DictReader(fh) if r["case_id"] == case_id)


def test_sidecar_records_digest(ingested) -> None:
    _, ws, out = ingested
    import hashlib

    for row in read_manifest(out):
        meta = json.loads(_vol(ws, row).with_suffix(".json").read_text())
        data = _vol(ws, row).read_bytes()
        assert meta["sha256"] == hashlib.sha256(data).hexdigest() and meta["bytes"] == len(data)
        assert meta["volume"] == row["volume"]
    # the rebuild recipe (source paths) is private, never beside the volume
    recipes = ws / "private" / "cache"
    assert (recipes.stat().st_mode & 0o077) == 0 and len(list(recipes.glob("*.json"))) == len(
        read_manifest(out)
    )


def test_truncated_volume_is_rebuilt_by_augment(ingested) -> None:
    """Today: Augment drops the case (code cache_unreadable) and keeps using the broken file."""
    cfg, ws, out = ingested
    rows = read_manifest(out)
    vol = _vol(ws, rows[0])
    good = vol.read_bytes()
    vol.write_bytes(good[: len(good) // 2])
    aug = _augment(cfg, ws, out, "x")
    assert len(read_index(aug)) == len(rows)
    spec = json.loads((aug / "transform_spec.json").read_text())
    assert spec["skipped"] == [] and spec["cache"] == {"cache_mismatch": 1, "cache_rebuilt": 1}
    assert vol.read_bytes() == good


def test_volume_overwritten_by_another_case_is_rebuilt(ingested) -> None:
    """Today: the other case's voxels are used silently (same shape, valid .npy)."""
    cfg, ws, out = ingested
    rows = read_manifest(out)
    good = _vol(ws, rows[0]).read_bytes()
    other = _vol(ws, rows[1]).read_bytes()
    assert good != other
    _vol(ws, rows[0]).write_bytes(other)
    arr, _ = load_volume(ws, rows[0]["volume"])
    assert _vol(ws, rows[0]).read_bytes() == good
    np.testing.assert_array_equal(arr, np.load(_vol(ws, rows[0])))
    # and model_inputs (Promote) reads verified volumes too
    _vol(ws, rows[0]).write_bytes(other)
    spec = json.loads((_augment(cfg, ws, out, "y") / "transform_spec.json").read_text())["deterministic"]
    _vol(ws, rows[0]).write_bytes(other)
    x = model_inputs(spec, rows[:2], ws)
    assert not np.array_equal(x[0], x[1])
    assert _vol(ws, rows[0]).read_bytes() == good


def test_truncated_volume_is_decoded_again_by_ingest(ingested) -> None:
    """Today: a rerun reuses the truncated volume because its side-car exists."""
    cfg, ws, out = ingested
    rows = read_manifest(out)
    good = _vol(ws, rows[0]).read_bytes()
    _vol(ws, rows[0]).write_bytes(good[:100])
    out2 = ws / "ingest" / "b"
    out2.mkdir()
    report = run_ingest(cfg, out2, ws)
    assert report["incremental"]["volumes_decoded"] == 1
    assert report["cache"] == {"cache_rebuilt": 1, "cache_unreadable": 1}
    assert _vol(ws, rows[0]).read_bytes() == good


def test_lost_source_is_a_rejection_on_every_rerun(ingested) -> None:
    """Today: Promote's model_inputs crashes with the truncated file, night after night."""
    cfg, ws, out = ingested
    rows = read_manifest(out)
    victim = rows[0]
    for f in _source_of(ws, out, victim["case_id"]):
        Path(f).unlink()
    _vol(ws, victim).write_bytes(b"\x93NUMPY")
    for name in ("x", "y"):  # the second run fails the same way: no crash loop
        aug = _augment(cfg, ws, out, name)
        spec = json.loads((aug / "transform_spec.json").read_text())
        assert [s["code"] for s in spec["skipped"]] == ["cache_lost"]
        assert spec["skipped"][0]["case_id"] == victim["case_id"]
        assert len(read_index(aug)) == len(rows) - 1
        text = json.dumps(spec)
        assert str(ws.parent) not in text  # no source path in the record
    with pytest.raises(CacheFault) as err:
        model_inputs(spec["deterministic"], [victim], ws)
    assert err.value.code == "cache_lost"


def test_load_split_rebuilds_a_bad_tensor(ingested) -> None:
    """Today: a truncated tensor makes every training/evaluation run fail; another case's tensor is used."""
    cfg, ws, out = ingested
    aug = _augment(cfg, ws, out, "x")
    rows = read_index(aug)
    split = rows[0]["split"]
    sel = [r for r in rows if r["split"] == split]
    before = load_split(aug, rows, split)
    assert before.repairs == []
    t0 = aug / "tensors" / f"{sel[0]['case_id']}.npy"
    good = t0.read_bytes()
    t0.write_bytes(good[:-10])
    data = load_split(aug, rows, split)
    assert data.case_ids == before.case_ids and np.array_equal(data.x, before.x)
    assert data.repairs == [{"case_id": sel[0]["case_id"], "code": "tensor_mismatch", "outcome": "rebuilt"}]
    assert t0.read_bytes() == good
    # its cached volume broken too: both rebuilt
    vol = _vol(ws, next(r for r in read_manifest(out) if r["case_id"] == sel[0]["case_id"]))
    vol.write_bytes(b"")
    t0.unlink()
    data = load_split(aug, rows, split)
    assert np.array_equal(data.x, before.x)
    assert data.repairs == [
        {"case_id": sel[0]["case_id"], "code": "tensor_unreadable", "outcome": "rebuilt", "volume": "rebuilt"}
    ]


def test_load_split_leaves_out_a_tensor_that_cannot_be_rebuilt(ingested) -> None:
    cfg, ws, out = ingested
    aug = _augment(cfg, ws, out, "x")
    rows = read_index(aug)
    split = rows[0]["split"]
    cid = rows[0]["case_id"]
    row = next(r for r in read_manifest(out) if r["case_id"] == cid)
    for f in _source_of(ws, out, cid):
        Path(f).unlink()
    _vol(ws, row).unlink()
    (aug / "tensors" / f"{cid}.npy").write_bytes(b"junk")
    for _ in range(2):
        data = load_split(aug, rows, split)
        assert cid not in data.case_ids
        assert data.repairs == [
            {"case_id": cid, "code": "tensor_mismatch", "outcome": "left_out", "cause": "cache_lost"}
        ]
        assert len(data) == sum(r["split"] == split for r in rows) - 1


@pytest.mark.parametrize("recipe", ["missing", "garbled"])
def test_no_usable_recipe_is_cache_lost(ingested, recipe) -> None:
    _, ws, out = ingested
    row = read_manifest(out)[0]
    path = ws / "private" / "cache" / (Path(row["volume"]).stem + ".json")
    if recipe == "missing":
        path.unlink()
    else:
        path.write_text('{"item": 3}')
    _vol(ws, row).write_bytes(b"")
    with pytest.raises(CacheFault) as err:
        load_volume(ws, row["volume"])
    assert err.value.code == "cache_lost" and str(ws) not in str(err.value)

"""Several images per case (``data.channels``, issue 17 point 3): selection, world-space combination, codes,
per-channel normalisation, the cache, preflight, and a whole run with two channels.

Real data: the Siemens EPI series of dcm_qa_nih (four phase-encoding directions of one study, 2 volumes
each) and the GE 4D EPI (another study). Ingest-level tests that form fewer cases than a trainable split
needs replace ``check_splits`` (the split rule is tested in test_splits.py); nothing else is replaced.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from pipeline.config import load_config
from pipeline.errors import IngestError
from tests.conftest import write_config

NIH = (Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom" / "dcm_qa_nih" / "In").resolve()
BINARY = {"kind": "binary", "classes": {"0": "neg", "1": "pos"}, "positive_class": "pos"}


def _study_uids() -> dict[str, str]:
    """Vendor folder -> StudyInstanceUID (read here; the test data must be present: no skip)."""
    assert NIH.is_dir(), f"test data missing: {NIH}"
    out = {}
    for vendor in ("20180918Si", "20180918GE"):
        first = sorted((NIH / vendor).rglob("*.dcm"))[0]
        out[vendor] = str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)
    return out


def _ingest(config: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, list[dict[str, str]], Path]:
    import pipeline.ingest.stage as stage

    monkeypatch.setattr(stage, "check_splits", lambda rows, cfg: None)  # too few cases for a split
    cfg = load_config(config)
    ws = Path(cfg.runtime.workspace)
    out = ws / "ingest" / "t"
    out.mkdir(parents=True, exist_ok=True)
    report = stage.run_ingest(cfg, out, ws)
    with open(out / "manifest.csv", newline="") as fh:
        return report, list(csv.DictReader(fh)), ws


def _nih_config(root: Path, channels: list[dict], **data) -> Path:
    uids = _study_uids()
    (root / "labels.csv").write_text(f"study,label\n{uids['20180918Si']},1\n{uids['20180918GE']},0\n")
    return write_config(
        root,
        task=BINARY,
        data={
            "source": str(NIH),
            "labels_csv": "labels.csv",
            "id_column": "study",
            "id_type": "StudyInstanceUID",
            "label_column": "label",
            "channels": channels,
            **data,
        },
    )


def _series_volume(folder: str) -> np.ndarray:
    from pipeline.ingest.sources import load_dicom

    return load_dicom([str(f) for f in sorted((NIH / "20180918Si" / folder).glob("*.dcm"))]).array


def test_two_series_of_a_study_are_one_case(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.ingest.volume_cache import load_volume

    config = _nih_config(
        tmp_path,
        [{"name": "ap", "series_description": "pe=ap"}, {"name": "pa", "series_description": "PE=PA"}],
    )
    report, rows, ws = _ingest(config, monkeypatch)
    assert len(rows) == 1 and rows[0]["label"] == "1"  # the Siemens study; both series carry its label
    array, meta = load_volume(ws, rows[0]["volume"])
    ap, pa = _series_volume("mr_0003"), _series_volume("mr_0004")
    assert ap.ndim == 4 and ap.shape[3] == 2  # real 4D (2 volumes): the rule must be reported
    assert array.shape == (*ap.shape[:3], 2) and meta["axis4"] == "channels"
    assert meta["channel_names"] == ["ap", "pa"]
    np.testing.assert_allclose(array[..., 0], ap[..., 0])  # same grid: no resampling, voxels kept
    np.testing.assert_allclose(array[..., 1], pa[..., 0])
    assert "4d_first_volume_only" in rows[0]["flags"].split(";")
    assert report["case_flags"]["4d_first_volume_only"] == 1
    # the GE study has no series matching 'ap': a per-case code naming the channel and the case pseudonym
    missing = [p for p in report["problems"] if p["code"] == "missing_channel"]
    assert len(missing) == 1 and "'ap'" in missing[0]["reason"] and missing[0]["case_id"].startswith("C")
    assert report["channels"]["cases_formed"] == 2 and report["channels"]["cases_selected"] == 1
    assert report["channels"]["images_not_used"] == 3  # RL, LR and the GE series
    shared = (ws / "ingest" / "t" / "ingest_report.json").read_text() + (
        ws / "ingest" / "t" / "manifest.csv"
    ).read_text()
    for value in ("EPI PE", "Axial EPI", "epi_pe", "20180918", _study_uids()["20180918Si"]):
        assert value.lower() not in shared.lower()  # no SeriesDescription, path or UID published


def test_channel_volume_index_picks_a_4d_volume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.ingest.volume_cache import load_volume

    config = _nih_config(
        tmp_path,
        [
            {"name": "ap1", "series_description": "PE=AP", "volume": 1},
            {"name": "rl", "series_description": "PE=RL"},
        ],
    )
    _, rows, ws = _ingest(config, monkeypatch)
    array, _ = load_volume(ws, rows[0]["volume"])
    np.testing.assert_allclose(array[..., 0], _series_volume("mr_0003")[..., 1])
    assert "4d_first_volume_only" in rows[0]["flags"]  # the rl channel still took its first volume


def test_ambiguous_and_missing_channels_are_per_case_codes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _nih_config(
        tmp_path,
        [{"name": "ap", "series_description": "PE=AP"}, {"name": "any_pe", "series_description": "PE="}],
    )
    with pytest.raises(IngestError) as err:  # no case left: both studies are refused, each with its code
        _ingest(config, monkeypatch)
    assert err.value.code == "nothing_ingested"
    assert "ambiguous_channel x1" in err.value.reason and "missing_channel x1" in err.value.reason


# --- NIfTI cases with CSV path columns ---------------------------------------------------------------------

T1_AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])  # 20 x 20 x 10 voxels: x from 0 to 38 mm


def _world_value(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A linear function of the world position (trilinear resampling reproduces it exactly)."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    return (100 + xyz[..., 0] + 0.5 * xyz[..., 1] + 0.25 * xyz[..., 2]).astype(np.float32)


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path.name


def _geometry_project(root: Path) -> Path:
    rng = np.random.default_rng(0)
    src = root / "images"
    shifted = T1_AFFINE.copy()
    shifted[0, 3] = 30.0  # x from 30 mm: covers 25% of the first channel's field of view
    partial = np.diag([1.5, 2.0, 3.0, 1.0])
    partial[0, 3] = 12.0  # x from 12 mm, another spacing: covers 70%
    rows = []
    for n, (case, t2_aff, t2_shape) in enumerate(
        (
            ("same", T1_AFFINE, (20, 20, 10)),
            ("partial", partial, (30, 20, 10)),
            ("far", shifted, (20, 20, 10)),
            ("no_t2", None, None),
        )
    ):
        _nifti(src / case / "t1.nii.gz", rng.normal(50, 10, (20, 20, 10)).astype(np.float32), T1_AFFINE)
        t2 = ""
        if t2_aff is not None:
            _nifti(src / case / "t2.nii.gz", _world_value(t2_aff, t2_shape), t2_aff)
            t2 = f"{case}/t2.nii.gz"
        rows.append(f"{case},{n % 2},{case}/t1.nii.gz,{t2}")
    (root / "labels.csv").write_text("case,label,t1_path,t2_path\n" + "\n".join(rows) + "\n")
    return write_config(
        root,
        task=BINARY,
        preprocess={"spatial_dims": 3, "image_size": 16},
        data={
            "source": "images",
            "labels_csv": "labels.csv",
            "id_column": "case",
            "id_type": "path",
            "label_column": "label",
            "channels": [{"name": "t1", "column": "t1_path"}, {"name": "t2", "column": "t2_path"}],
        },
    )


def test_csv_path_channels_resampled_in_world_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.ingest.deid import load_or_create_key, pseudonym
    from pipeline.ingest.volume_cache import load_volume

    report, rows, ws = _ingest(_geometry_project(tmp_path), monkeypatch)
    key = load_or_create_key(ws / "private")
    cid = {name: pseudonym(f"row|{name}", key, prefix="C") for name in ("same", "partial", "far", "no_t2")}
    by_case = {r["case_id"]: r for r in rows}
    assert set(by_case) == {cid["same"], cid["partial"]}
    codes = {p.get("case_id"): p["code"] for p in report["problems"]}
    assert codes[cid["far"]] == "channel_grid_mismatch" and codes[cid["no_t2"]] == "missing_channel"
    far = next(p for p in report["problems"] if p.get("case_id") == cid["far"])
    assert "'t2'" in far["reason"] and "25%" in far["reason"] and "images" not in far["reason"]

    array, meta = load_volume(ws, by_case[cid["partial"]]["volume"])
    assert array.shape == (20, 20, 10, 2) and meta["channel_overlap"] == [1.0, 0.7]
    np.testing.assert_allclose(meta["affine"], T1_AFFINE)  # the first channel's grid
    # voxel (10, 5, 3) of the t1 grid is world (20, 10, 9) mm, inside t2: t2's value at that point
    assert array[10, 5, 3, 1] == pytest.approx(100 + 20 + 5 + 2.25, abs=1e-3)
    assert array[2, 5, 3, 1] == 0.0  # world x = 4 mm lies outside t2's field of view
    assert "channels_resampled" in by_case[cid["partial"]]["flags"]
    same, _ = load_volume(ws, by_case[cid["same"]]["volume"])
    np.testing.assert_allclose(same[..., 1], _world_value(T1_AFFINE, (20, 20, 10)))  # same grid: exact


def test_combined_volume_is_verified_and_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.ingest.volume_cache import load_volume

    _, rows, ws = _ingest(_geometry_project(tmp_path), monkeypatch)
    name = rows[0]["volume"]
    good, _ = load_volume(ws, name)
    npy = ws / "cache" / "volumes" / name
    npy.write_bytes(npy.read_bytes()[:-64] + bytes(64))  # same length, other content
    audit: Counter = Counter()
    again, _ = load_volume(ws, name, audit)
    np.testing.assert_array_equal(again, good)
    assert audit["cache_rebuilt"] == 1 and audit["cache_mismatch"] == 1
    recipe = json.loads((ws / "private" / "cache" / npy.with_suffix(".json").name).read_text())
    assert recipe["combine"] and len(recipe["volumes"]) == 2


def test_without_channels_nothing_changes() -> None:
    """A config without data.channels keeps its digests (existing Ingest folders are reused) and its published
    form; with channels the Ingest digest changes."""
    from pipeline.config.schema import Config
    from pipeline.config.sections import ChannelConfig

    cfg = Config.model_validate(
        {
            "task": BINARY,
            "data": {
                "source": "images",
                "labels_csv": "labels.csv",
                "id_column": "study",
                "id_type": "StudyInstanceUID",
                "group_columns": ["site"],
            },
        }
    )
    # computed with the code before data.channels existed (commit 049663a)
    assert cfg.hashed("data") == "1f78d11bee06"
    assert cfg.hashed("task", "data", "split", "ingest", "deid") == "759b4df3db7a"
    assert "channels" not in cfg.public_dict()["data"]
    with_ch = cfg.model_copy(
        update={
            "data": cfg.data.model_copy(
                update={"channels": (ChannelConfig(name="t1", series_description="t1"),)}
            )
        }
    )
    assert with_ch.hashed("data") != cfg.hashed("data")
    assert with_ch.public_dict()["data"]["channels"][0]["name"] == "t1"


# --- normalisation and augmentation -------------------------------------------------------------------------


def _spec(names=("t1", "t2"), dims=2):
    from models import get_spec
    from pipeline.augment.preprocess import make_spec
    from pipeline.config import PreprocessConfig

    pc = PreprocessConfig(spatial_dims=dims, image_size=16)
    return make_spec(pc, get_spec("efficientnet_lite0"), len(names), None, names)


def test_each_named_channel_is_normalised_on_its_own() -> None:
    from pipeline.augment.preprocess import preprocess

    rng = np.random.default_rng(1)
    t1 = rng.normal(100, 20, (24, 24, 1)).astype(np.float32)
    case = np.stack([t1, t1], axis=-1)
    scaled = np.stack([t1, t1 * 1000 + 5], axis=-1)  # a sequence on another intensity scale
    spec = _spec()
    assert spec.channels == 2 and len(spec.mean) == 2 and spec.to_dict()["channel_names"] == ("t1", "t2")
    a, b = preprocess(case, "channels", spec), preprocess(scaled, "channels", spec)
    assert a.shape == (2, 16, 16)
    np.testing.assert_allclose(a, b, atol=1e-4)  # per-channel scaling: the second channel's scale is gone
    with pytest.raises(IngestError) as err:
        preprocess(t1, None, spec)  # a single image given to a two-channel model
    assert err.value.code == "channel_count_mismatch"


def test_one_spatial_transform_for_all_channels_and_no_colour_jitter() -> None:
    from pipeline.augment.transforms import RandColourJitter, apply, build_train_transform
    from pipeline.config import AugmentConfig

    cfg = AugmentConfig(preset="strong", noise_std=0.0)  # noise is drawn per voxel and channel, by design
    tf = build_train_transform(cfg, 2, 16, channels=3, colour=False)
    assert not any(isinstance(t, RandColourJitter) for t in tf.transforms)
    assert any(
        isinstance(t, RandColourJitter) for t in build_train_transform(cfg, 2, 16, channels=3).transforms
    )
    rng = np.random.default_rng(2)
    x = np.repeat(rng.normal(0, 1, (1, 16, 16)).astype(np.float32), 3, axis=0)
    for seed in range(5):
        y = apply(tf, x, seed)
        assert not np.allclose(y, x)  # something was applied
        np.testing.assert_allclose(y[1], y[0], atol=1e-5)  # the same flip, grid and intensity draw
        np.testing.assert_allclose(y[2], y[0], atol=1e-5)


# --- preflight ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("channels", "field", "code"),
    [
        (
            [{"name": "t1", "column": "t1_path"}, {"name": "t2", "column": "t2_col"}],
            "data.channels[1].column",
            "missing_column",
        ),
        ([{"name": "t1", "series_description": "t1("}], "data.channels.0", None),
        ([{"name": "t1", "column": "t1_path"}, {"name": "t1", "column": "t2_path"}], "data.channels", None),
        ([{"name": "t1", "column": "t1_path"}, {"name": "t2", "column": "t2_path"}], None, None),
    ],
)
def test_preflight_refuses_bad_channels_with_the_field(tmp_path: Path, capsys, channels, field, code) -> None:
    from tasks.cli import main

    _geometry_project(tmp_path)
    config = write_config(
        tmp_path,
        task=BINARY,
        preprocess={"spatial_dims": 3, "image_size": 16},
        model={"backbone": "resnet10_3d_compact", "pretrained": False},
        data={
            "source": "images",
            "labels_csv": "labels.csv",
            "id_column": "case",
            "id_type": "path",
            "label_column": "label",
            "channels": channels,
        },
    )
    rc = main(["check", str(config)])
    out = capsys.readouterr()
    text = out.out + out.err
    if field is None:  # the good config passes
        assert rc == 0 and "valid" in text, text
        return
    assert rc == 2 and field in text and "Traceback" not in text, text
    if code:
        assert f"code {code}" in text


# --- predict ------------------------------------------------------------------------------------------------


def test_predict_groups_series_as_ingest_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A series_description model scores cases grouped by the same rule: the same combined volume as Ingest
    cached, and the GE study refused with its code; `medtl convert --config` writes that volume too."""
    from pipeline.ingest.channels import case_units, load_case
    from pipeline.ingest.convert import convert_tree
    from pipeline.ingest.deid import load_or_create_key
    from pipeline.ingest.sources import LoadOptions, scan_sources
    from pipeline.ingest.volume_cache import load_volume

    config = _nih_config(
        tmp_path,
        [{"name": "ap", "series_description": "PE=AP"}, {"name": "pa", "series_description": "PE=PA"}],
    )
    _, rows, ws = _ingest(config, monkeypatch)
    cfg = load_config(config)
    key = load_or_create_key(ws / "private")
    items, _ = scan_sources(NIH)
    problems: list[dict] = []
    units = case_units(cfg.data, items, key, problems)
    assert len(units) == 1 and [p["code"] for p in problems] == ["missing_channel"]
    vol = load_case(cfg.data, units[0][1], LoadOptions(), "C1")
    cached, _ = load_volume(ws, rows[0]["volume"])
    np.testing.assert_allclose(vol.array, cached)
    assert vol.meta["axis4"] == "channels"
    # `medtl convert --config`: the per-series files, plus the combined case the model sees
    out = tmp_path / "converted"
    summary = convert_tree(NIH, out, key, data=cfg.data)
    assert summary["cases"]["converted"] == 1 and summary["cases"]["codes"] == {"missing_channel": 1}
    (case_file,) = summary["cases"]["outputs"]
    import json

    import nibabel as nib

    np.testing.assert_allclose(np.asarray(nib.load(out / case_file).dataobj), cached, rtol=1e-5, atol=1e-3)
    side = json.loads((out / case_file.replace(".nii.gz", ".json")).read_text())
    assert side["channels"] == ["ap", "pa"] and side["axis_order"] == "i, j, k, channels"


# --- a whole run --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_channel_nifti_run_end_to_end(tmp_path: Path, capsys) -> None:
    """`medtl run` on 40 two-channel NIfTI cases (the signal is in t2 only): two input channels reach the
    backbone, the artefact names them, and `medtl predict` refuses CSV-column channels with its code."""
    from pipeline.trained.artefact import TrainedModel
    from tasks.cli import main

    rng = np.random.default_rng(3)
    rows = []
    for i in range(40):
        label = i % 2
        t1 = rng.normal(80, 10, (32, 32, 1)).astype(np.float32)
        t2 = rng.normal(300, 40, (32, 32, 1)).astype(np.float32)
        if label:
            r, c = rng.integers(2, 22, 2)
            t2[r : r + 8, c : c + 8] += 400
        _nifti(tmp_path / "images" / f"s{i:02d}" / "t1.nii.gz", t1, np.eye(4))
        _nifti(tmp_path / "images" / f"s{i:02d}" / "t2.nii.gz", t2, np.eye(4))
        rows.append(f"s{i:02d},{label},s{i:02d}/t1.nii.gz,s{i:02d}/t2.nii.gz")
    (tmp_path / "labels.csv").write_text("case,label,t1_path,t2_path\n" + "\n".join(rows) + "\n")
    config = write_config(
        tmp_path,
        task=BINARY,
        data={
            "source": "images",
            "labels_csv": "labels.csv",
            "id_column": "case",
            "id_type": "path",
            "label_column": "label",
            "channels": [{"name": "t1", "column": "t1_path"}, {"name": "t2", "column": "t2_path"}],
        },
    )
    assert main(["run", str(config)]) == 0
    ws = tmp_path / "ws"
    report = json.loads(next((ws / "ingest").glob("*/ingest_report.json")).read_text())
    assert report["cases"] == 40 and report["channels"]["cases_selected"] == 40
    aug = next(d for d in (ws / "augment").iterdir() if d.is_dir() and not d.name.startswith("."))
    assert np.load(next((aug / "tensors").glob("*.npy"))).shape == (2, 32, 32)
    spec = json.loads((aug / "transform_spec.json").read_text())
    assert spec["deterministic"]["channel_names"] == ["t1", "t2"]
    assert not any("RandColourJitter" in t["transform"] for t in spec["train_random"])
    ft = next(
        d for d in (ws / "finetune").iterdir() if d.is_dir() and d.name[0] != "." and "work" not in d.name
    )
    info = json.loads((ft / "model_info.json").read_text())
    assert info["in_chans"] == 2
    assert TrainedModel.load(ft).channel_names == ["t1", "t2"]
    capsys.readouterr()
    (tmp_path / "new").mkdir()
    assert main(["predict", str(config), "--input", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err
    assert "path columns" in err and "medtl run" in err and "Traceback" not in err


def test_predict_refuses_channels_it_cannot_group(tmp_path: Path) -> None:
    from pipeline.augment.preprocess import PreprocessSpec
    from pipeline.errors import MedtlError
    from pipeline.ops.predict import _check_channels

    cfg = load_config(_geometry_project(tmp_path))
    spec = PreprocessSpec(
        2, 32, "minmax", None, (0.5, 0.5), (0.5, 0.5), channels=2, channel_names=("t1", "t2")
    )
    with pytest.raises(MedtlError) as err:
        _check_channels(cfg, spec)
    assert err.value.code == "multichannel_predict_unsupported"
    other = PreprocessSpec(
        2, 32, "minmax", None, (0.5, 0.5), (0.5, 0.5), channels=2, channel_names=("t2", "t1")
    )
    with pytest.raises(MedtlError) as err:
        _check_channels(cfg, other)
    assert err.value.code == "channel_config_mismatch"


def test_4d_series_without_channels_is_flagged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One image per case (no data.channels): a 4D series still gives the network its first volume only,
    and that is stated per case (flag 4d_first_volume_only), not silent."""
    src = NIH / "20180918Si"
    (tmp_path / "labels.csv").write_text("series,label\nmr_0003,1\nmr_0004,0\nmr_0005,1\nmr_0006,0\n")
    config = write_config(
        tmp_path,
        task=BINARY,
        data={
            "source": str(src),
            "labels_csv": "labels.csv",
            "id_column": "series",
            "id_type": "path",
            "label_column": "label",
        },
    )
    report, rows, _ = _ingest(config, monkeypatch)
    assert len(rows) == 4 and all("4d_first_volume_only" in r["flags"].split(";") for r in rows)
    assert report["case_flags"]["4d_first_volume_only"] == 4 and "channels" not in report

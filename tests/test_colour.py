"""Colour stays colour: RGB images keep three channels from ingest to the backbone's RGB stem and back out
through predict/export, grey and colour mixes follow a stated rule, and colour is never min-maxed per
channel. Real data: a RetinaMNIST subset (colour fundus photographs, tests/data/retina)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.augment.preprocess import channel_count, make_spec, preprocess, to_rgb
from pipeline.config import PreprocessConfig

RETINA = Path(__file__).parent / "data" / "retina" / "retinamnist_subset.npz"


class _Spec:  # a backbone spec with an RGB stem and ImageNet statistics
    in_chans = 3
    intensity = "minmax"
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)


def test_colour_rule_and_spec() -> None:
    auto = PreprocessConfig(spatial_dims=2, image_size=32)
    assert channel_count(auto, 0.7, _Spec) == 3 and channel_count(auto, 0.3, _Spec) == 1
    assert channel_count(PreprocessConfig(channels="grey"), 1.0, _Spec) == 1
    assert channel_count(PreprocessConfig(channels="rgb"), 0.0, _Spec) == 3

    class OneChannel(_Spec):
        in_chans = 1

    assert channel_count(auto, 1.0, OneChannel) == 1  # e.g. MedicalNet: no RGB stem
    spec = make_spec(auto, _Spec, channels=3)
    assert spec.channels == 3 and spec.intensity == "window" and spec.window == (0.0, 255.0)
    assert spec.mean == _Spec.mean and spec.std == _Spec.std
    grey = make_spec(auto, _Spec, channels=1)
    assert grey.channels == 1 and grey.mean == pytest.approx(np.mean(_Spec.mean))


def test_colour_is_kept_and_never_min_maxed_per_channel() -> None:
    img = np.zeros((40, 30, 1, 3), np.uint8)  # (X, Y, Z, C): a reddish image
    img[..., 0], img[..., 1], img[..., 2] = 200, 60, 40
    spec = make_spec(PreprocessConfig(spatial_dims=2, image_size=16), _Spec, channels=3)
    x = preprocess(img, "rgb", spec)
    assert x.shape == (3, 16, 16)
    rgb = x * np.array(_Spec.std)[:, None, None] + np.array(_Spec.mean)[:, None, None]
    centre = rgb[:, 8, 8]
    np.testing.assert_allclose(centre, np.array([200, 60, 40]) / 255, atol=1e-3)  # hues kept exactly
    # grey images in a colour dataset are replicated
    g = preprocess(np.full((20, 20, 1), 128, np.uint8), None, spec)
    back = g * np.array(_Spec.std)[:, None, None] + np.array(_Spec.mean)[:, None, None]
    np.testing.assert_allclose(back[:, 10, 10], [128 / 255] * 3, atol=1e-3)
    assert to_rgb(np.zeros((5, 5, 1)), None).shape == (5, 5, 1, 3)


@pytest.mark.slow
def test_rgb_fundus_images_train_as_colour_end_to_end(tmp_path: Path) -> None:
    from PIL import Image

    from pipeline.config import load_config
    from pipeline.workspace import plan_stages
    from tasks.cli import run_pipeline
    from tests.conftest import write_config

    d = np.load(RETINA)
    (tmp_path / "images").mkdir()
    lines = ["file,diagnosis"]
    for i, (img, grade) in enumerate(zip(d["images"], d["grades"], strict=True)):
        Image.fromarray(img).save(tmp_path / "images" / f"fundus_{i:03d}.png")
        lines.append(f"fundus_{i:03d}.png,{'lesion' if grade >= 2 else 'normal'}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    config = write_config(tmp_path, preprocess={"spatial_dims": 2, "image_size": 32}, train={"epochs": 1})
    assert run_pipeline(config) == 0
    plan = plan_stages(load_config(config))
    spec = json.loads((plan.augment / "transform_spec.json").read_text())
    assert spec["deterministic"]["channels"] == 3 and spec["colour"]["colour"] == 80
    info = json.loads((plan.finetune / "model_info.json").read_text())
    assert info["in_chans"] == 3 and info["preprocessing"]["channels"] == 3
    x = np.load(next((plan.augment / "tensors").glob("*.npy")))
    assert x.shape == (3, 32, 32) and not np.allclose(x[0], x[1])  # real colour, not replicated grey
    from pipeline.trained.artefact import TrainedModel

    model = TrainedModel.load(plan.finetune)
    assert model.input_shape == (3, 32, 32)
    # the same data with preprocess.channels: grey trains a one-channel model
    grey = write_config(tmp_path, preprocess={"spatial_dims": 2, "image_size": 32, "channels": "grey"},
                        train={"epochs": 1})
    assert run_pipeline(grey) == 0
    gplan = plan_stages(load_config(grey))
    assert json.loads((gplan.finetune / "model_info.json").read_text())["in_chans"] == 1


def test_colour_jitter_changes_hue_but_keeps_grey_grey() -> None:
    import torch

    from pipeline.augment.transforms import build_train_transform, colour_jitter
    from pipeline.config import AugmentConfig

    red = torch.zeros(3, 4, 4)
    red[0] = 1.0
    turned = colour_jitter(red, 0.0, 1.0, 1.0, 2 * np.pi / 3)  # 120 degrees: red -> green
    assert torch.argmax(turned[:, 0, 0]) == 1
    grey = torch.full((3, 4, 4), 0.3)
    torch.testing.assert_close(colour_jitter(grey, 0.0, 1.0, 1.5, 1.0), grey)  # no chroma to turn or scale
    std = AugmentConfig(preset="standard")
    names = lambda tf: [type(t).__name__ for t in tf.transforms]  # noqa: E731
    assert "RandColourJitter" in names(build_train_transform(std, 2, 32, channels=3))
    assert "RandColourJitter" not in names(build_train_transform(std, 2, 32, channels=1))


@pytest.mark.parametrize(
    "name",
    [
        "SC_rgb_jpeg_gdcm.dcm",  # RGB, JPEG baseline
        "SC_rgb_rle.dcm",  # RGB, RLE lossless
        "SC_rgb_dcmtk_+eb+cy+n2.dcm",  # YBR_FULL, JPEG
        "SC_rgb_dcmtk_+eb+cy+np.dcm",  # YBR_FULL_422, JPEG
        "SC_ybr_full_422_uncompressed.dcm",  # YBR_FULL_422 native (2 bytes per pixel, was "truncated")
    ],
)
def test_colour_dicom_decodes_to_rgb(name: str, tmp_path: Path) -> None:
    """pydicom's own colour test files (real encoder output): every one decodes to RGB, first pixel red."""
    import shutil

    from pydicom.data import get_testdata_file

    from pipeline.ingest.sources import LoadOptions, load_item, scan_sources

    src = get_testdata_file(name, download=False)
    assert src is not None, f"pydicom's bundled test file {name} is missing"
    shutil.copy(src, tmp_path / name)
    items, rejected = scan_sources(tmp_path, kinds=("dicom",))
    assert not rejected, [r.code for r in rejected]
    vol = load_item(items[0], LoadOptions())
    assert vol.meta.get("axis4") == "rgb" and vol.array.shape[-1] == 3
    first = vol.array.reshape(-1, 3)[0].astype(int)
    assert first[0] > 240 and first[1] < 15 and first[2] < 15, first.tolist()


def test_gradcam_overlay_shows_colour_inputs_in_colour() -> None:
    from types import SimpleNamespace

    from pipeline.report.plots import explanation_figure

    case = SimpleNamespace(case_id="C1", correct=True, true_name="a", pred_name="a", prob=0.9)
    rgb = explanation_figure(np.random.rand(1, 3, 8, 8), np.random.rand(1, 8, 8), [case])
    grey = explanation_figure(np.random.rand(1, 1, 8, 8), np.random.rand(1, 8, 8), [case])
    assert rgb.axes[0].images[0].get_array().shape == (8, 8, 3)
    assert grey.axes[0].images[0].get_array().shape == (8, 8)


def test_palette_colour_dicom_decodes_through_its_lookup_tables(tmp_path: Path) -> None:
    """pydicom's real PALETTE COLOR ultrasound (Philips CX50, Doppler): indices become RGB through the
    palette tables (16-bit entries brought to 8 bits), not grey indices; a file whose tables are missing is
    a per-file rejection with a code."""
    import shutil

    import numpy as np
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.pixels import apply_color_lut

    from pipeline.errors import IngestError
    from pipeline.ingest.sources import LoadOptions, load_item, scan_sources

    src = get_testdata_file("examples_palette.dcm", download=False)
    assert src is not None, "pydicom's bundled test file examples_palette.dcm is missing"
    shutil.copy(src, tmp_path / "palette.dcm")
    items, rejected = scan_sources(tmp_path, kinds=("dicom",))
    assert not rejected, [r.code for r in rejected]
    vol = load_item(items[0], LoadOptions())
    assert vol.meta.get("axis4") == "rgb" and vol.array.shape == (800, 350, 1, 3)
    rgb = vol.array[:, :, 0, :].transpose(1, 0, 2)  # back to (rows, cols, 3)
    ds = pydicom.dcmread(src)
    expected = (apply_color_lut(ds.pixel_array, ds)[..., :3] >> 8).astype(np.uint8)
    np.testing.assert_array_equal(rgb, expected)
    chroma = np.abs(rgb[..., 0].astype(int) - rgb[..., 2].astype(int)) > 20
    assert 0.05 < chroma.mean() < 0.5  # the Doppler colour is there, the B-mode stays grey

    del ds.RedPaletteColorLookupTableData
    ds.save_as(tmp_path / "palette.dcm")
    items, rejected = scan_sources(tmp_path, kinds=("dicom",))
    with pytest.raises(IngestError) as err:
        load_item(items[0], LoadOptions())
    assert err.value.code == "bad_palette"

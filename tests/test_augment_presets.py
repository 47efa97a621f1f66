"""Augmentation presets (2D/3D, CT window jitter) and the pipeline-owned random state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import RandAffine, RandFlip

from pipeline.augment.transforms import (
    HU_WINDOWS,
    PRESETS,
    RandWindowJitter,
    apply,
    build_train_transform,
    describe,
    resolve_preset,
    rewindow,
    sample_seed,
)
from pipeline.config import AugmentConfig


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("dims", [2, 3])
def test_presets_replay_exactly_and_keep_shape(preset: str, dims: int, rng: np.random.Generator) -> None:
    tf = build_train_transform(AugmentConfig(preset=preset), dims, 12)
    x = rng.normal(size=(1,) + (12,) * dims).astype(np.float32)
    seeds = [sample_seed(0, e, i) for e in range(2) for i in range(3)]
    outs = [apply(tf, x, s) for s in seeds]
    again = [apply(tf, x, s) for s in seeds]
    for a, b in zip(outs, again, strict=True):
        assert a.shape == x.shape and a.dtype == np.float32
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, x) for a in outs)  # something random happened
    assert len({a.tobytes() for a in outs}) > 1  # and differently per sample


def test_preset_fills_only_unset_fields() -> None:
    cfg = AugmentConfig.model_validate({"preset": "strong", "rotate_deg": 3.0})
    eff = resolve_preset(cfg, 2)
    assert eff.rotate_deg == 3.0  # set in the config: kept
    assert eff.scale == PRESETS["strong"][2]["scale"] and eff.noise_std == PRESETS["strong"][2]["noise_std"]
    assert resolve_preset(AugmentConfig(), 2) == AugmentConfig()  # custom: unchanged


def test_3d_presets_rotate_about_all_axes_and_strong_flips_every_axis() -> None:
    tf = build_train_transform(AugmentConfig(preset="strong"), 3, 16)
    flips = [t for t in tf.transforms if isinstance(t, RandFlip)]
    assert sorted(f.flipper.spatial_axis for f in flips) == [0, 1, 2]
    aff = next(t for t in tf.transforms if isinstance(t, RandAffine))
    assert len(aff.rand_affine_grid.rotate_range) == 3
    assert all(np.max(np.abs(r)) > 0 for r in aff.rand_affine_grid.rotate_range)
    spec = describe(tf)
    assert any(d["transform"].endswith("RandAffine") for d in spec)


def test_ct_preset_has_window_jitter_and_hu_windows_are_level_width() -> None:
    tf = build_train_transform(AugmentConfig(preset="ct"), 3, 16)
    assert any(isinstance(t, RandWindowJitter) for t in tf.transforms)
    assert HU_WINDOWS["brain"] == (0.0, 80.0) and HU_WINDOWS["lung"] == (-1350.0, 150.0)
    for lo, hi in HU_WINDOWS.values():
        assert lo < hi


def test_rewindow_stays_in_range_and_is_identity_for_the_full_window(rng: np.random.Generator) -> None:
    x = torch.from_numpy(rng.uniform(-1, 1, (1, 8, 8)).astype(np.float32))
    torch.testing.assert_close(rewindow(x, 0.5, 1.0), x)
    y = rewindow(x, 0.55, 0.8)
    assert float(y.min()) >= float(x.min()) - 1e-6 and float(y.max()) <= float(x.max()) + 1e-6
    # narrower window = more contrast: the values are more spread towards the ends
    assert float((y == y.max()).sum() + (y == y.min()).sum()) > 2
    t = RandWindowJitter(prob=1.0, jitter=0.2)
    t.set_random_state(seed=7)
    a = t(x)
    t.set_random_state(seed=7)
    torch.testing.assert_close(t(x), a)
    with pytest.raises(ValueError, match="jitter=0.9"):
        RandWindowJitter(jitter=0.9)


def test_zscore_nonzero_keeps_the_shape_of_a_constant_foreground() -> None:
    """A binary mask (AdrenalMNIST3D-like) must not be z-scored to all zeros (foreground std is 0)."""
    from pipeline.augment.preprocess import PreprocessSpec, preprocess

    vol = np.zeros((12, 12, 12), dtype=np.uint8)
    vol[3:9, 4:8, 2:10] = 255
    spec = PreprocessSpec(spatial_dims=3, image_size=12, intensity="zscore_nonzero", window=None, mean=0.0, std=1.0)
    out = preprocess(vol, None, spec)[0]
    ref = np.transpose(vol, (2, 1, 0)) != 0
    assert out[ref].min() > 0.5 and np.abs(out[~ref]).max() < 1e-6
    # a textured foreground is still z-scored over the non-zero voxels
    tex = vol.astype(np.float32) * np.linspace(0.5, 1.5, 12)[None, None, :]
    out2 = preprocess(tex, None, spec)[0]
    fg = out2[np.transpose(tex, (2, 1, 0)) != 0]
    assert abs(fg.mean()) < 1e-4 and abs(fg.std() - 1) < 1e-3

"""3D volumes in physical space: reoriented to RAS and resampled to a target voxel size before resizing,
so proportions and orientation do not depend on how the scanner stored the array."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.augment.preprocess import check_spacing, make_spec, preprocess, ras_spacing, target_spacing_of
from pipeline.config import PreprocessConfig
from pipeline.errors import IngestError

NIFTI = Path(__file__).parent / "data" / "nifti"


class _Backbone:
    in_chans = 1
    intensity = "minmax"
    mean = (0.5,)
    std = (0.5,)


def _ball(spacing: tuple[float, float, float], shape: tuple[int, int, int], radius_mm: float = 12.0) -> np.ndarray:
    """A ball of ``radius_mm`` at the centre of a grid with the given voxel size (X, Y, Z order)."""
    grids = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)], indexing="ij")
    return (np.sqrt(sum(g**2 for g in grids)) <= radius_mm).astype(np.float32) * 100


def _extent(x: np.ndarray) -> list[int]:
    """Voxels covered by the object along each axis of a (1, D, H, W) input."""
    m = x[0] > x[0].min() + 0.25 * (x[0].max() - x[0].min())
    return [int(np.any(m, axis=tuple(j for j in range(3) if j != i)).sum()) for i in range(3)]


def test_anisotropic_volume_keeps_its_proportions() -> None:
    spacing = (0.8, 0.8, 5.0)  # 128 x 128 x 8 at 0.8 x 0.8 x 5 mm: thick slices
    vol = _ball(spacing, (64, 64, 10))[..., None][..., 0]
    affine = np.diag([*spacing, 1.0])
    shape_only = make_spec(PreprocessConfig(spatial_dims=3, image_size=32), _Backbone)
    physical = make_spec(PreprocessConfig(spatial_dims=3, image_size=32), _Backbone, target_spacing=(1.0, 1.0, 1.0))
    e_shape = _extent(preprocess(vol, None, shape_only, affine))
    e_phys = _extent(preprocess(vol, None, physical, affine))
    # a ball stays a ball (within the partial-volume loss of 5 mm slices)...
    assert max(e_phys) - min(e_phys) <= 3, e_phys
    # ...while resizing by array shape stretched it six-fold along the slice axis (the former behaviour)
    assert max(e_shape) > 2.5 * min(e_shape), e_shape


def test_the_same_anatomy_stored_lps_or_ras_gives_the_same_input() -> None:
    rng = np.random.default_rng(0)
    vol = rng.normal(0, 1, (20, 24, 16)).astype(np.float32)
    ras = np.diag([1.5, 1.5, 2.0, 1.0])
    ras[:3, 3] = [-15, -18, -16]
    # the same voxels stored with the first two axes reversed (LPS-style storage), affine adjusted
    flipped = vol[::-1, ::-1, :].copy()
    lps = ras.copy()
    lps[:3, 0] *= -1
    lps[:3, 1] *= -1
    lps[:3, 3] = ras[:3, :3] @ np.array([19, 23, 0]) + ras[:3, 3]
    spec = make_spec(PreprocessConfig(spatial_dims=3, image_size=16), _Backbone, target_spacing=(2.0, 2.0, 2.0))
    np.testing.assert_allclose(preprocess(flipped, None, spec, lps), preprocess(vol, None, spec, ras), atol=1e-4)


def test_bad_or_missing_spacing_is_a_per_case_code() -> None:
    spec = make_spec(PreprocessConfig(spatial_dims=3, image_size=16), _Backbone, target_spacing=(1.0, 1.0, 1.0))
    vol = np.zeros((8, 8, 8), np.float32)
    for affine in (None, np.diag([0.0, 1.0, 1.0, 1.0]), np.diag([1.0, 1.0, 80.0, 1.0]), np.full((4, 4), np.nan)):
        with pytest.raises(IngestError) as err:
            preprocess(vol, None, spec, affine)
        assert err.value.code == "bad_spacing"
    assert check_spacing(np.diag([0.5, 0.5, 3.0, 1.0])).tolist() == [0.5, 0.5, 3.0]


def test_ras_spacing_and_median_target_on_real_nifti() -> None:
    import nibabel as nib

    func = nib.load(NIFTI / "functional.nii")  # 4 x 4 x 8 mm, stored L-A-S
    assert ras_spacing(func.affine).tolist() == pytest.approx([4.0, 4.0, 8.0])
    anat = nib.load(NIFTI / "anatomical.nii")
    assert target_spacing_of([ras_spacing(func.affine), ras_spacing(anat.affine), ras_spacing(anat.affine)]) == (
        2.0, 2.0, 2.0,
    )
    spec = make_spec(PreprocessConfig(spatial_dims=3, image_size=24), _Backbone, target_spacing=(2.0, 2.0, 2.0))
    x = preprocess(np.asarray(func.dataobj)[..., 0], None, spec, func.affine)
    assert x.shape == (1, 24, 24, 24) and np.isfinite(x).all()


def test_preview_draws_3d_slices_in_physical_proportions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An anisotropic target voxel (x 1 mm, y 3 mm) draws each axial pixel three times as high as wide, and
    the sheet says so; without a target spacing the sheet says it shows array proportions."""
    from types import SimpleNamespace

    import matplotlib.figure

    from pipeline.augment.stage import _preview

    (tmp_path / "tensors").mkdir()
    rng = np.random.default_rng(0)
    np.save(tmp_path / "tensors" / "c1.npy", rng.random((1, 6, 8, 8)).astype(np.float16))
    figures: list = []
    real_savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(
        matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), real_savefig(fig, *a, **k))
    )
    cfg = SimpleNamespace(augment=SimpleNamespace(preview=1), train=SimpleNamespace(seed=0))
    rows = [{"case_id": "c1", "label_index": "0"}]
    from monai.transforms import Compose

    identity = Compose([])
    for spacing, aspect, words in (((1.0, 3.0, 2.0), 3.0, "physical proportions"), (None, 1.0, "array")):
        _preview(tmp_path, rows, identity, cfg, 3, spacing)
        fig = figures[-1]
        drawn = [ax for ax in fig.axes if ax.images]
        assert len(drawn) == 2 and all(ax.get_aspect() == pytest.approx(aspect) for ax in drawn)
        assert words in fig._suptitle.get_text()
        assert (tmp_path / "preview.png").stat().st_size > 0

"""The trained-model artefact: saved calibrators rebuild exactly, files are verified by sha256, the scorer
applies ensemble, TTA and the saved calibrator the same way for every consumer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import softmax

from pipeline.trained.artefact import (
    CALIBRATOR_FILE,
    INFO_FILE,
    MODEL_FILE,
    TrainedModel,
    TrainedModelError,
    save_calibrator,
    save_model,
)
from pipeline.trained.calibration import (
    CALIBRATOR_NAMES,
    calibrator_from_state,
    calibrator_state,
    make_calibrator,
)
from pipeline.trained.nets import FlipTTA, FoldEnsemble, build_network
from pipeline.trained.scorer import Scorer


def _logits(k: int, n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    z = rng.normal(0, 1, (n, k)) + 2.5 * np.eye(k)[y]
    return z, y


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("method", CALIBRATOR_NAMES)
def test_calibrator_state_round_trip_is_exact(method: str, k: int) -> None:
    z, y = _logits(k)
    params = {"random_state": 3} if method == "auto" else {}
    cal = make_calibrator(method, **params).fit(z, y)
    state = json.loads(json.dumps(calibrator_state(cal)))  # through JSON, as on disk
    again = calibrator_from_state(state)
    zt, _ = _logits(k, n=200, seed=1)
    np.testing.assert_allclose(again.predict_proba(zt), cal.predict_proba(zt), rtol=0, atol=1e-12)


def test_calibrator_state_refuses_unfitted_and_unknown() -> None:
    with pytest.raises(ValueError, match="not fitted"):
        calibrator_state(make_calibrator("temperature"))
    with pytest.raises(ValueError, match="calibration method"):
        calibrator_from_state({"method": "magic", "params": {}, "fitted": {"n_classes_": 2}})
    with pytest.raises(ValueError, match="n_classes_"):
        calibrator_from_state({"method": "temperature", "params": {}, "fitted": {}})


def _info(**extra) -> dict:
    info = {
        "backbone": "efficientnet_lite0",
        "num_classes": 2,
        "in_chans": 1,
        "spatial_dims": 2,
        "image_size": 32,
        "class_names": ["neg", "pos"],
        "positive_class": "pos",
        "task": "binary",
        "tta": "none",
        "preprocessing": {
            "spatial_dims": 2,
            "image_size": 32,
            "intensity": "minmax",
            "window": None,
            "mean": 0.5,
            "std": 0.5,
            "clip_percentiles": [0.5, 99.5],
        },
    }
    info.update(extra)
    return info


def _saved(tmp_path: Path, **extra) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    info = _info(**extra)
    net = build_network(info).eval()
    out = tmp_path / "finetune"
    save_model(out, net, info)
    return out, net


def test_save_and_load_verifies_sha256(tmp_path: Path) -> None:
    out, net = _saved(tmp_path)
    info = json.loads((out / INFO_FILE).read_text())
    assert info["schema_version"] == 2 and len(info["files"][MODEL_FILE]) == 64
    model = TrainedModel.load(out)
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(model.network(x).numpy(), net(x).numpy(), atol=1e-6)
    assert model.verified and model.input_shape == (1, 32, 32)
    # an altered model.pt (same keys and shapes, other values) is refused, never scored
    sd = torch.load(out / MODEL_FILE, weights_only=True)
    first = next(k for k, v in sd.items() if v.is_floating_point())
    sd[first] = sd[first] + 1.0
    torch.save(sd, out / MODEL_FILE)
    with pytest.raises(TrainedModelError) as err:
        TrainedModel.load(out)
    assert err.value.code == "model_digest_mismatch" and "altered" in str(err.value)


def test_missing_and_broken_files_have_codes(tmp_path: Path) -> None:
    out, _ = _saved(tmp_path)
    (out / INFO_FILE).write_text("{not json")
    with pytest.raises(TrainedModelError) as err:
        TrainedModel.load(out)
    assert err.value.code == "model_unreadable"
    (out / INFO_FILE).unlink()
    with pytest.raises(TrainedModelError) as err:
        TrainedModel.load(out)
    assert err.value.code == "model_missing"


def test_calibrator_is_bound_to_its_model(tmp_path: Path) -> None:
    out, _ = _saved(tmp_path)
    model = TrainedModel.load(out)
    z, y = _logits(2)
    cal = make_calibrator("temperature").fit(z, y)
    ev = tmp_path / "evaluate"
    ev.mkdir()
    conformal = {"method": "lac", "alpha": 0.1, "qhat": 0.8, "n_calibration": 400}
    save_calibrator(ev, cal, model.files, {"split": "calibration", "n_cases": 400}, conformal)
    loaded = TrainedModel.load(out, calibrator_dir=ev)
    assert loaded.calibrator.temperature_ == pytest.approx(cal.temperature_, rel=0, abs=0)
    assert set(loaded.files) == {MODEL_FILE, CALIBRATOR_FILE}
    # a calibrator fitted for another model is refused
    doc = json.loads((ev / CALIBRATOR_FILE).read_text())
    doc["model_sha256"] = "0" * 64
    (ev / CALIBRATOR_FILE).write_text(json.dumps(doc))
    with pytest.raises(TrainedModelError) as err:
        TrainedModel.load(out, calibrator_dir=ev)
    assert err.value.code == "calibrator_mismatch"
    (ev / CALIBRATOR_FILE).unlink()
    with pytest.raises(TrainedModelError) as err:
        TrainedModel.load(out, calibrator_dir=ev)
    assert err.value.code == "calibrator_missing"


def test_scorer_applies_ensemble_tta_and_saved_calibrator(tmp_path: Path) -> None:
    out, net = _saved(tmp_path, ensemble={"folds": 2}, tta="flip")
    assert isinstance(net, FoldEnsemble)
    model = TrainedModel.load(out)
    assert isinstance(model.network, FlipTTA)
    x = np.random.default_rng(0).normal(0, 1, (5, 1, 32, 32)).astype(np.float32)
    scorer = Scorer(model, "cpu")
    z = scorer.logits(x)
    # by hand: mean probability over members and both mirror images
    xt = torch.from_numpy(x)
    with torch.no_grad():
        probs = [
            torch.softmax(m(v), 1).numpy() for m in net.members for v in (xt, xt.flip(3))
        ]
    np.testing.assert_allclose(softmax(z, axis=1), np.mean(probs, axis=0), atol=1e-5)
    # without a calibrator, calibrated == raw; with one, calibrated == the calibrator on the logits
    s = scorer.score(x)
    np.testing.assert_allclose(s.calibrated, s.raw)
    zc, yc = _logits(2)
    cal = make_calibrator("platt").fit(zc, yc)
    ev = tmp_path / "ev"
    ev.mkdir()
    save_calibrator(ev, cal, model.files, {"split": "calibration", "n_cases": len(yc)})
    s2 = Scorer(TrainedModel.load(out, ev), "cpu").score(x)
    np.testing.assert_allclose(s2.calibrated, cal.predict_proba(s2.logits), atol=1e-12)
    assert not np.allclose(s2.calibrated, s2.raw)
    # features: each member's classifier input, concatenated; no TTA
    f = scorer.features(x)
    assert f.shape == (5, 2 * net.members[0].get_classifier().in_features)
    assert np.isfinite(f).all()
    # the explanation network is the ensemble without TTA
    assert scorer.explanation_network() is model.network.model


def test_preprocess_uses_the_recorded_spec(tmp_path: Path) -> None:
    out, _ = _saved(tmp_path)
    model = TrainedModel.load(out)
    arr = np.arange(40 * 40, dtype=np.float32).reshape(40, 40, 1)
    x = model.preprocess(arr, None)
    assert x.shape == model.input_shape and x.dtype == np.float32
    assert x.min() == pytest.approx(-1.0, abs=0.05) and x.max() == pytest.approx(1.0, abs=0.05)

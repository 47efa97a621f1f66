"""The trained model as one artefact: what was saved, how it is saved, and how it is loaded and verified.

A FineTune folder holds

* ``model.pt``: the network's state dict (a k-fold ensemble's members as ``members.<k>.*``), plain tensors
  loaded with ``torch.load(..., weights_only=True)``;
* ``model_info.json``: what rebuilds and feeds the network: backbone, classes, input channels and size,
  the deterministic preprocessing spec (so scoring new scans needs no Augment folder), the ensemble, the
  TTA mode, the provenance of every member's pretrained weights, and ``files``: the sha256 of every file
  of the artefact, checked on every load.

The calibrator is fitted by Evaluate (on the calibration split only) and saved beside its report as
``calibrator.json`` (:func:`save_calibrator`): the fitted parameters as plain JSON (no pickle), the
sha256 of the ``model.pt`` it was fitted for, and the conformal threshold. :meth:`TrainedModel.load` with
that folder gives the calibrated model predict, promotion and export use; nothing refits it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import MedtlError
from pipeline.io import atomic_path, file_sha256, write_json
from pipeline.trained.calibration import calibrator_from_state, calibrator_state
from pipeline.trained.nets import build_network, members, with_tta

__all__ = [
    "CALIBRATOR_FILE",
    "INFO_FILE",
    "MODEL_FILE",
    "TrainedModel",
    "TrainedModelError",
    "artefact_digests",
    "artefact_files",
    "file_sha256",
    "verify_files",
    "preprocess_spec",
    "save_calibrator",
    "save_model",
    "weights_provenance",
]

MODEL_FILE = "model.pt"
INFO_FILE = "model_info.json"
CALIBRATOR_FILE = "calibrator.json"
SCHEMA_VERSION = 2


class TrainedModelError(MedtlError):
    """A trained model's files are missing, altered (sha256 mismatch) or do not fit together."""

    default_code = "model_integrity"


def weights_provenance(network: nn.Module) -> list[dict[str, Any]] | None:
    """Per member: the pretrained file each started from (file name, sha256, source, pinned), or None.

    File names only (never a directory path); None when no member started from pretrained weights.
    """
    out = []
    for m in members(network):
        w = getattr(m, "pretrained_weights", None)
        if w is None:
            out.append(None)
            continue
        d = w.to_dict() if hasattr(w, "to_dict") else dict(w)
        if d.get("path"):
            d["path"] = os.path.basename(str(d["path"]))
        out.append(d)
    return out if any(d is not None for d in out) else None


def save_model(out_dir: Path, network: nn.Module, info: dict[str, Any]) -> dict[str, Any]:
    """Write ``model.pt`` and ``model_info.json`` (with the sha256 of ``model.pt``) atomically.

    Args:
        out_dir: The FineTune output folder.
        network: The trained network or :class:`~pipeline.trained.nets.FoldEnsemble` (no TTA wrapper).
        info: What rebuilds it (see module doc); ``files`` and ``schema_version`` are filled in here.

    Returns:
        The ``model_info.json`` content written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / MODEL_FILE) as tmp:
        torch.save({k: v.detach().cpu() for k, v in network.state_dict().items()}, tmp)
    full = dict(info, schema_version=SCHEMA_VERSION, files={MODEL_FILE: file_sha256(out_dir / MODEL_FILE)})
    write_json(out_dir / INFO_FILE, full)
    return full


def save_calibrator(
    out_dir: Path,
    calibrator: Any,
    model_files: dict[str, str],
    fitted_on: dict[str, Any],
    conformal: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``calibrator.json`` into an Evaluate folder: the fitted calibrator, bound to its model.

    Args:
        out_dir: The Evaluate output folder.
        calibrator: The fitted calibrator, or None when none was applied.
        model_files: The model's ``files`` (sha256 per file); the calibrator is refused for any other model.
        fitted_on: Which split and how many cases (no identifiers).
        conformal: The conformal sets' method, alpha and threshold, when fitted.
    """
    doc = {
        "schema_version": 1,
        "method": "none" if calibrator is None else getattr(calibrator, "chosen_", None) or _method(calibrator),
        "state": None if calibrator is None else calibrator_state(calibrator),
        "model_sha256": model_files.get(MODEL_FILE),
        "fitted_on": fitted_on,
        "conformal": conformal,
    }
    write_json(Path(out_dir) / CALIBRATOR_FILE, doc)
    return doc


def _method(cal: Any) -> str:
    return calibrator_state(cal)["method"]


@dataclass
class TrainedModel:
    """A loaded, verified trained model.

    Attributes:
        info: ``model_info.json``.
        network: The network with its ensemble and TTA, in eval mode on the CPU.
        files: sha256 per file of the artefact as verified on load (``calibrator.json`` included when given).
        calibrator: The calibrator fitted by Evaluate, or None (then probabilities are the raw softmax).
        calibrator_info: ``calibrator.json`` (method, fitted_on, conformal) or None.
        verified: False only for a model saved before digests were recorded (schema 1).
    """

    info: dict[str, Any]
    network: nn.Module
    files: dict[str, str]
    calibrator: Any = None
    calibrator_info: dict[str, Any] | None = None
    verified: bool = True
    folder: str = field(default="", repr=False)

    @classmethod
    def load(
        cls, finetune_dir: Path, calibrator_dir: Path | None = None, expected: dict[str, str] | None = None
    ) -> TrainedModel:
        """Rebuild, verify and load a trained model (and its calibrator from an Evaluate folder).

        Args:
            finetune_dir: The FineTune folder.
            calibrator_dir: The Evaluate folder whose ``calibrator.json`` to apply (None: raw softmax).
            expected: sha256 per file as recorded elsewhere (the model registry); every listed file must
                match, so replacing ``model.pt`` together with ``model_info.json`` is caught too.

        Raises:
            TrainedModelError: A file is missing or its sha256 differs from the one recorded when it was
                written (or in ``expected``); or the calibrator was fitted for another model.
        """
        d = Path(finetune_dir)
        if expected:
            verify_files(artefact_files(d, calibrator_dir), expected, d.name)
        info = _read_json(d / INFO_FILE, d.name)
        recorded = info.get("files") or {}
        verified = bool(recorded)
        model_path = d / MODEL_FILE
        if not model_path.is_file():
            raise TrainedModelError(f"trained model {d.name}: {MODEL_FILE} is missing", code="model_missing")
        files = {MODEL_FILE: file_sha256(model_path)}
        if verified and recorded.get(MODEL_FILE) != files[MODEL_FILE]:
            raise TrainedModelError(
                f"trained model {d.name}: {MODEL_FILE} has sha256 {files[MODEL_FILE][:12]}..., but "
                f"{recorded.get(MODEL_FILE, '?')[:12]}... was recorded when it was written: the file was "
                "altered or replaced; retrain (delete the folder) or restore the original",
                code="model_digest_mismatch",
            )
        net = build_network(info)
        sd = torch.load(model_path, map_location="cpu", weights_only=True)
        net.load_state_dict(sd)
        net = with_tta(
            net, info.get("tta", "none"), int(info["spatial_dims"]), info.get("task") == "multilabel"
        ).eval()
        model = cls(info=info, network=net, files=files, verified=verified, folder=d.name)
        if calibrator_dir is not None:
            model.attach_calibrator(Path(calibrator_dir))
        return model

    def attach_calibrator(self, evaluate_dir: Path) -> None:
        """Load ``calibrator.json`` from an Evaluate folder; it must name this model's ``model.pt``."""
        path = Path(evaluate_dir) / CALIBRATOR_FILE
        if not path.is_file():
            raise TrainedModelError(
                f"trained model {self.folder}: {CALIBRATOR_FILE} is missing in evaluate/{Path(evaluate_dir).name}; "
                "re-run Evaluate for this model",
                code="calibrator_missing",
            )
        doc = _read_json(path, Path(evaluate_dir).name)
        if doc.get("model_sha256") != self.files[MODEL_FILE]:
            raise TrainedModelError(
                f"evaluate/{Path(evaluate_dir).name}/{CALIBRATOR_FILE} was fitted for another model "
                f"(model sha256 {str(doc.get('model_sha256'))[:12]}..., this one {self.files[MODEL_FILE][:12]}...)",
                code="calibrator_mismatch",
            )
        self.calibrator = calibrator_from_state(doc["state"]) if doc.get("state") else None
        self.calibrator_info = doc
        self.files[CALIBRATOR_FILE] = file_sha256(path)

    @property
    def class_names(self) -> list[str]:
        return list(self.info["class_names"])

    @property
    def spatial_dims(self) -> int:
        return int(self.info["spatial_dims"])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One input without the batch axis: ``(C, H, W)`` or ``(C, D, H, W)``."""
        side = int(self.info["image_size"])
        return (int(self.info.get("in_chans", 1)), *([side] * self.spatial_dims))

    @property
    def channel_names(self) -> list[str]:
        """The named input channels of a multi-image model (``data.channels``), in input order; empty for
        one image per case (and for models saved before channels existed)."""
        return list((self.preprocessing or {}).get("channel_names") or [])

    @property
    def preprocessing(self) -> dict[str, Any] | None:
        """The deterministic preprocessing spec recorded at training (None for schema-1 models)."""
        return self.info.get("preprocessing")

    def preprocess(self, array: np.ndarray, axis4: str | None, affine: Any = None) -> np.ndarray:
        """One cached/decoded volume (its RAS+ ``affine`` for 3D) -> the network input, with the spec the
        model was trained with (channels, target voxel size, intensity, size)."""
        from pipeline.augment.preprocess import preprocess

        if self.preprocessing is None:
            raise TrainedModelError(
                f"trained model {self.folder} records no preprocessing spec (saved by an older medtl); retrain it",
                code="model_schema",
            )
        return preprocess(array, axis4, preprocess_spec(self.preprocessing), affine)


def preprocess_spec(spec: dict[str, Any]):
    """``transform_spec.json``'s ``deterministic`` dict -> :class:`pipeline.augment.preprocess.PreprocessSpec`."""
    from pipeline.augment.preprocess import PreprocessSpec

    d = dict(spec)
    d["window"] = tuple(d["window"]) if d.get("window") else None
    d["clip_percentiles"] = tuple(d.get("clip_percentiles", (0.5, 99.5)))
    for k in ("mean", "std", "target_spacing", "channel_names"):
        if isinstance(d.get(k), list):
            d[k] = tuple(d[k])
    return PreprocessSpec(**d)


def artefact_files(finetune_dir: Path, evaluate_dir: Path | None = None) -> dict[str, Path]:
    """The files of a trained model, by name: ``model.pt``, ``model_info.json`` (and ``calibrator.json``)."""
    out = {MODEL_FILE: Path(finetune_dir) / MODEL_FILE, INFO_FILE: Path(finetune_dir) / INFO_FILE}
    if evaluate_dir is not None:
        out[CALIBRATOR_FILE] = Path(evaluate_dir) / CALIBRATOR_FILE
    return out


def artefact_digests(finetune_dir: Path, evaluate_dir: Path | None = None) -> dict[str, str]:
    """sha256 of every file of a trained model (for the registry), after checking ``model.pt`` against the
    digest recorded when it was written."""
    files = artefact_files(finetune_dir, evaluate_dir)
    out = {}
    for name, path in files.items():
        if not path.is_file():
            raise TrainedModelError(f"trained model {Path(finetune_dir).name}: {name} is missing", code="model_missing")
        out[name] = file_sha256(path)
    recorded = (_read_json(files[INFO_FILE], Path(finetune_dir).name).get("files") or {}).get(MODEL_FILE)
    if recorded is not None and recorded != out[MODEL_FILE]:
        raise TrainedModelError(
            f"trained model {Path(finetune_dir).name}: {MODEL_FILE} differs from the sha256 recorded when it was "
            "written: the file was altered or replaced",
            code="model_digest_mismatch",
        )
    return out


def verify_files(files: dict[str, Path], expected: dict[str, str], name: str) -> None:
    """Every file named in ``expected`` must exist and have that sha256 (else TrainedModelError)."""
    for fname, digest in expected.items():
        path = files.get(fname)
        if path is None or not path.is_file():
            raise TrainedModelError(f"trained model {name}: {fname} is missing", code="model_missing")
        got = file_sha256(path)
        if got != digest:
            raise TrainedModelError(
                f"trained model {name}: {fname} has sha256 {got[:12]}..., the registry recorded {digest[:12]}... "
                "when the model was registered: the file was altered or replaced; restore it or retrain",
                code="model_digest_mismatch",
            )


def _read_json(path: Path, name: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise TrainedModelError(f"trained model {name}: {path.name} is missing", code="model_missing") from err
    except (OSError, ValueError) as err:
        raise TrainedModelError(
            f"trained model {name}: {path.name} is unreadable or not JSON ({type(err).__name__})",
            code="model_unreadable",
        ) from err

"""Export a registered model for deployment: TorchScript (traced) or ONNX, each checked against PyTorch.

The exported network (fold ensemble and TTA included) maps inputs ``(N, C, H, W)`` (2D) or
``(N, C, D, H, W)`` (3D), preprocessed as recorded in the sidecar JSON beside it, to logits ``(N, K)``; the
sidecar also holds the saved calibrator (the one Evaluate fitted) and the sha256 of the exported file.
After writing, the file is loaded back (``torch.jit.load`` / ``onnxruntime``) and its outputs on seeded
random inputs must match the PyTorch model within ``atol`` (default 1e-4), else the export is an error.

What the outputs mean is written into the exported file itself (ONNX ``metadata_props``, a TorchScript extra
file ``medtl.json``) as well as in the sidecar: ``activation`` is ``softmax`` (single-label: the class
probabilities are the softmax over the ``K`` outputs) or ``sigmoid`` (``task.kind: multilabel``: ``F``
outputs, one per finding in ``output_names`` order, each finding's probability the sigmoid of its own
output; findings co-occur, so the outputs are never passed through a softmax). A fold ensemble or TTA of a
multilabel model averages each finding's probability (its output is the logit of that mean).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import MedtlError
from pipeline.io import atomic_path, write_json

FORMATS = ("onnx", "torchscript")


def export_model(
    workspace: Path, model: dict[str, Any], fmt: str, out_dir: Path, atol: float = 1e-4, seed: int = 0
) -> dict[str, Any]:
    """Export ``model`` (a registry row) to ``out_dir`` in ``fmt``; return the check summary.

    Raises:
        MedtlError: Unknown format, missing package, or outputs differing by more than ``atol``.
    """
    from pipeline.trained.artefact import TrainedModel, file_sha256

    if fmt not in FORMATS:
        raise MedtlError(f"export --format {fmt!r}: expected one of {FORMATS}", code="bad_argument")
    ws = Path(workspace)
    trained = TrainedModel.load(
        ws / "finetune" / model["finetune"],
        ws / "evaluate" / model["evaluate"],
        expected=model.get("files") or None,
    )
    net, info = trained.network.eval(), trained.info
    meaning = output_meaning(info)
    shape = trained.input_shape
    g = torch.Generator().manual_seed(seed)
    example = torch.randn((2, *shape), generator=g)
    check = torch.randn((5, *shape), generator=g)
    with torch.no_grad():
        expected = net(check).numpy()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"model{model['id']}"
    if fmt == "torchscript":
        path = out_dir / f"{stem}.torchscript.pt"
        with torch.no_grad():
            traced = torch.jit.trace(net, example, check_trace=False)
        with atomic_path(path) as tmp:
            traced.save(str(tmp), _extra_files={"medtl.json": json.dumps(meaning)})
        loaded = torch.jit.load(str(path), map_location="cpu")
        with torch.no_grad():
            got = loaded(check).numpy()
        runtime = f"torch {torch.__version__}"
    else:
        try:
            import onnx  # noqa: F401 - the metadata is written with it (_onnx_metadata)
            import onnxruntime as ort
        except ImportError as err:
            raise MedtlError(
                "export --format onnx needs the packages onnx and onnxruntime (pip install onnx onnxruntime)"
            ) from err
        path = out_dir / f"{stem}.onnx"
        with atomic_path(path) as tmp, torch.no_grad():
            torch.onnx.export(
                net,
                (example,),
                str(tmp),
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
            _onnx_metadata(tmp, meaning)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = sess.run(["logits"], {"input": check.numpy()})[0]
        runtime = f"onnxruntime {ort.__version__}"
    diff = float(np.max(np.abs(got - expected)))
    if not diff <= atol:
        path.unlink(missing_ok=True)
        raise MedtlError(
            f"export {fmt}: outputs differ from PyTorch by {diff:.3g} > atol {atol:g}; file removed",
            code="export_mismatch",
        )
    spec = trained.preprocessing or json.loads(
        (ws / "augment" / model["augment"] / "transform_spec.json").read_text()
    )["deterministic"]
    layout = "(N, {}, H, W)" if trained.spatial_dims == 2 else "(N, {}, D, H, W)"
    summary = {
        "model_id": model["id"],
        "format": fmt,
        "file": path.name,
        "max_abs_difference": diff,
        "atol": atol,
        "checked_with": runtime,
        "n_check_inputs": int(check.shape[0]),
        "sha256": file_sha256(path),
        "input_layout": layout.format(shape[0]),
        **meaning,
        "model_info": info,
        "model_files_sha256": trained.files,
        "preprocessing": spec,
        "calibrator": trained.calibrator_info,
        "code_version": model.get("code_version"),
        "data_snapshot": model.get("data_snapshot"),
    }
    write_json(out_dir / f"{stem}.{fmt}.json", summary)
    return summary


def output_meaning(info: dict[str, Any]) -> dict[str, Any]:
    """What the exported outputs are: ``output`` (a sentence), ``activation`` and ``output_names``."""
    from pipeline.trained.multilabel import is_multilabel

    names = list(info.get("class_names") or [])
    if is_multilabel(info):
        return {
            "output": f"logits (N, {len(names)}): one per finding; probability of finding j = "
            "sigmoid(logit_j) (findings co-occur: no softmax across outputs)",
            "activation": "sigmoid",
            "task": "multilabel",
            "output_names": names,
        }
    return {
        "output": f"logits (N, {len(names)}): class probabilities = softmax over the {len(names)} outputs",
        "activation": "softmax",
        "task": str(info.get("task") or "single-label"),
        "output_names": names,
    }


def _onnx_metadata(path: Path, meaning: dict[str, Any]) -> None:
    """Write ``meaning`` into the ONNX file's ``metadata_props`` (strings; lists as JSON)."""
    import onnx

    model = onnx.load(str(path))
    for k, v in meaning.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = f"medtl.{k}", v if isinstance(v, str) else json.dumps(v)
    onnx.save(model, str(path))

"""Export a registered model for deployment: TorchScript (traced) or ONNX, each checked against PyTorch.

The exported network maps inputs ``(N, 1, H, W)`` (2D) or ``(N, 1, D, H, W)`` (3D), preprocessed as in
``preprocessing.json`` beside it, to logits ``(N, K)``; the calibrator's parameters are in the same sidecar.
After writing, the file is loaded back (``torch.jit.load`` / ``onnxruntime``) and its outputs on seeded
random inputs must match the PyTorch model within ``atol`` (default 1e-4), else the export is an error.
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
    from pipeline.ops.predict import bundle_dir
    from pipeline.train.loop import load_trained_model

    if fmt not in FORMATS:
        raise MedtlError(f"export --format {fmt!r}: expected one of {FORMATS}")
    ws = Path(workspace)
    net, info = load_trained_model(ws / "finetune" / model["finetune"], torch.device("cpu"))
    net.eval()
    side = int(info["image_size"])
    shape = (1, side, side) if info["spatial_dims"] == 2 else (1, side, side, side)
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
            traced.save(str(tmp))
        loaded = torch.jit.load(str(path), map_location="cpu")
        with torch.no_grad():
            got = loaded(check).numpy()
        runtime = f"torch {torch.__version__}"
    else:
        try:
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
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = sess.run(["logits"], {"input": check.numpy()})[0]
        runtime = f"onnxruntime {ort.__version__}"
    diff = float(np.max(np.abs(got - expected)))
    if not diff <= atol:
        path.unlink(missing_ok=True)
        raise MedtlError(
            f"export {fmt}: outputs differ from PyTorch by {diff:.3g} > atol {atol:g}; file removed"
        )
    bdir = bundle_dir(ws, model["id"])
    spec = json.loads((ws / "augment" / model["augment"] / "transform_spec.json").read_text())
    calibrator = (
        json.loads((bdir / "calibrator.json").read_text()) if (bdir / "calibrator.json").is_file() else None
    )
    summary = {
        "model_id": model["id"],
        "format": fmt,
        "file": path.name,
        "max_abs_difference": diff,
        "atol": atol,
        "checked_with": runtime,
        "n_check_inputs": int(check.shape[0]),
        "input_layout": "(N, 1, H, W)" if info["spatial_dims"] == 2 else "(N, 1, D, H, W)",
        "output": "logits (N, K)",
        "model_info": info,
        "preprocessing": spec["deterministic"],
        "calibrator": calibrator,
        "code_version": model.get("code_version"),
        "data_snapshot": model.get("data_snapshot"),
    }
    write_json(out_dir / f"{stem}.{fmt}.json", summary)
    return summary

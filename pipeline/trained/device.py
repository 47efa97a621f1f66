"""Device choice and mixed precision, shared by training and scoring."""

from __future__ import annotations

import torch

from pipeline.errors import MedtlError

__all__ = ["autocast", "select_device"]


def select_device(requested: str) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is an error."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise MedtlError(
            "train.device: 'cuda' was requested but no CUDA device is available; use 'auto' or 'cpu'",
            code="no_cuda",
        )
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def autocast(device: torch.device, enabled: bool = True):
    """bf16 (or fp16) autocast on CUDA; disabled autocast on the CPU."""
    if device.type == "cuda" and enabled:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)

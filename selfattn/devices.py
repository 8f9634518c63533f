"""Which device and which autocast dtype a run uses (shared by training and evaluation)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from selfattn.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["resolve_device", "amp_dtype"]


def resolve_device(spec: str = "auto") -> "torch.device":
    """``auto`` picks cuda > mps > cpu; under torchrun on CUDA each rank takes ``cuda:LOCAL_RANK``."""
    import torch

    if spec == "auto":
        if torch.cuda.is_available():
            spec = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            spec = "mps"
        else:
            spec = "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise UserError(f"train.device {spec!r} is not a device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device {spec!r} asks for CUDA but torch.cuda.is_available() is False")
    return device


def amp_dtype(precision: str, device: "torch.device") -> "torch.dtype | None":
    """The autocast dtype: bf16 on CUDA for ``auto``; None = plain fp32."""
    import torch

    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        if precision == "auto":
            return None
        raise UserError(f"train.precision 'bf16' is not supported on {device}")
    return torch.bfloat16

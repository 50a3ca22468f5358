"""Small runtime helpers shared by training and evaluation: device choice,
mixed precision, and turning stored frames into model input."""
from __future__ import annotations

from contextlib import nullcontext

import torch


def resolve_device(name: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; a ``torch.device`` or
    another name as it is (an unknown name is a ``ValueError``)."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available on this machine (use 'cpu' or 'auto')")
    return dev


def device_for(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    """Where to run ``model``: ``device`` if given (``"auto"`` allowed), else
    where its parameters already are (e.g. where it was trained)."""
    if device is None:
        return next(model.parameters()).device
    return resolve_device(device)


def autocast_for(device: torch.device, amp: str):
    """bf16 autocast where asked for (``"bf16"``) or, with ``"auto"``, on GPUs
    that support it; on CPU ``"auto"`` stays fp32 (bf16 matmuls are slower on
    most CPUs without AMX)."""
    use = amp == "bf16" or (amp == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16) if use else nullcontext()


def to_float_video(video_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 frames ``[..., 3, H, W]`` -> float in [-1, 1]."""
    return video_uint8.float().div_(127.5).sub_(1.0)

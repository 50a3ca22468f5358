"""Small runtime helpers shared by training and evaluation: device choice,
mixed precision, and turning stored frames into model input."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import is_dataclass, replace

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


def host_to(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device``. A CPU tensor bound for a GPU goes through pinned
    memory without blocking: the host goes on assembling work while the
    copy runs, and the copy is ordered before the kernels that read it."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def video_to(video_uint8: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Stored uint8 frames ``[..., 3, H, W]`` -> float in [-1, 1] on
    ``device``, converted there: a quarter of the bytes cross to a GPU, and
    the conversion is the GPU's work instead of the host's."""
    return to_float_video(host_to(video_uint8, device))


def gather(t: torch.Tensor, rows) -> torch.Tensor:
    """``t[rows]`` for host-side row indices (a list, an array or a CPU
    tensor), wherever ``t`` lives. For a tensor on a GPU the indices go over
    first without blocking: indexing it with a host tensor would make the
    host wait for the copy."""
    rows = torch.as_tensor(rows)
    return t[host_to(rows, t.device) if t.device.type != "cpu" else rows]


# The decoded media a batch gathers from: the big tensors of a task's data.
MEDIA_KEYS = ("videos", "video", "audio")


def media_tensors(data) -> dict[str, torch.Tensor]:
    """The decoded media of a task's data (the fields ``media_on`` moves;
    none when the data is not a dataclass, which it cannot copy)."""
    found: dict[str, torch.Tensor] = {}
    if not is_dataclass(data):
        return found
    if isinstance(getattr(data, "videos", None), torch.Tensor):
        found["videos"] = data.videos
    inputs = getattr(data, "inputs", None)
    if isinstance(inputs, dict):
        found.update({k: inputs[k] for k in MEDIA_KEYS[1:] if isinstance(inputs.get(k), torch.Tensor)})
    return found


def media_on(data, device: torch.device | str, memo: dict | None = None):
    """A shallow copy of a task's data (a dataclass; other data is returned
    as it is) whose decoded media, its ``videos`` field and the ``video`` /
    ``audio`` of an ``inputs`` dict, live on ``device``; every other field
    is shared with ``data``.

    On a GPU a training step then gathers its batch on the device instead of
    copying it from the host. Text and indices stay on the host: they are
    small, and the host reads them to trim a batch's width. ``memo`` (by the
    tensor's identity) lets several tasks over the same data share one copy.
    """
    device = torch.device(device)
    memo = {} if memo is None else memo
    moved = {}
    for key, t in media_tensors(data).items():
        if id(t) not in memo:
            memo[id(t)] = (t, t.to(device))  # the source is kept so that its id stays its own
        moved[key] = memo[id(t)][1]
    if not moved:
        return data
    changes = {k: v for k, v in moved.items() if k == "videos"}
    if any(k != "videos" for k in moved):
        changes["inputs"] = {**data.inputs, **{k: v for k, v in moved.items() if k != "videos"}}
    return replace(data, **changes)


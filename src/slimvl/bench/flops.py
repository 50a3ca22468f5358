"""FLOPs from torch's own counter, with the CPU attention kernel registered.

``torch.utils.flop_counter`` knows the CUDA fused-attention kernels but not
the one SDPA picks on CPU (``_scaled_dot_product_flash_attention_for_cpu``),
so without help every CPU attention would count as zero FLOPs.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..nn.modalities import dummy_batch as modality_dummies

aten = torch.ops.aten


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    # query [B, H, N, d], key [B, H, S, d], value [B, H, S, dv]: QK^T then PV.
    b, h, n, d = query_shape
    s, dv = key_shape[2], value_shape[3]
    return 2 * b * h * n * s * d + 2 * b * h * n * s * dv


def _sdpa_cpu_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args: Any, out_shape=None,
                             **kwargs: Any) -> int:
    # Backward takes four products of the forward's size (dQ, dK, dV and the
    # gradient of the scores), i.e. twice the forward.
    return 2 * _sdpa_cpu_flops(query_shape, key_shape, value_shape)


def _custom_mapping() -> dict:
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_cpu_backward_flops
    return mapping


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    # The counter's module tracker trips over parameters that require grad
    # inside no_grad; freezing them for the count sidesteps it.
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


def count_flops(fn: Callable[[], Any], model: nn.Module | None = None) -> int:
    """Total FLOPs (multiply and add counted separately) of calling ``fn()``.

    Pass ``model`` to count an inference call: its parameters are frozen for
    the duration so no autograd graph is recorded.
    """
    counter = FlopCounterMode(display=False, custom_mapping=_custom_mapping())
    if model is None:
        with counter:
            fn()
    else:
        with _frozen(model), counter:
            fn()
    return counter.get_total_flops()


def model_flops_per_pair(model: nn.Module, frames: int, text_len: int, batch: int = 1) -> float:
    """Counted inference FLOPs to score one example (a (video, text) pair, or
    whatever ``model.modalities`` read) of ``frames`` frames and ``text_len``
    text tokens (averaged over a batch of ``batch``)."""
    inputs = dummy_batch(model, frames, text_len, batch)
    was_training = model.training
    model.eval()
    try:
        total = count_flops(lambda: call_model(model, inputs), model)
    finally:
        model.train(was_training)
    return total / batch


def dummy_batch(model: nn.Module, frames: int, text_len: int, batch: int,
                device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> dict:
    """Random inputs of the right shapes for every modality ``model`` reads
    (``slimvl.nn.modalities``), as an inputs mapping (for counting and timing)."""
    device = device or next(model.parameters()).device
    sizes = {"frames": frames, "text_len": text_len}
    return modality_dummies(model.modalities, model.config, batch, sizes, device, dtype)


def call_model(model: nn.Module, inputs: dict):
    """Run ``model`` on an inputs mapping. A video-text model is called
    positionally, as every slimvl model can be (so a subclass written with
    ``forward(video, text_ids, text_mask)`` keeps working); a model of other
    modalities takes the mapping."""
    if tuple(model.modalities) == ("video", "text"):
        return model(inputs["video"], inputs["text"], inputs["text_mask"])
    return model(inputs)


def dummy_inputs(model: nn.Module, frames: int, text_len: int, batch: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
    """``(video, text_ids, text_mask)`` of ``dummy_batch`` for a video-text model."""
    inputs = dummy_batch(model, frames, text_len, batch, device, dtype)
    return inputs["video"], inputs["text"], inputs["text_mask"]

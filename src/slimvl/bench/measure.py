"""Latency, memory and achieved throughput, always next to a same-run baseline.

These machines are shared and noisy: an absolute time means little alone, so
every report pairs a model's figures with a plain matmul of the same dtype
measured in the same process (how close the model runs to the hardware) and
with the other models of the run (ratios).
"""
from __future__ import annotations

import ctypes
import sys
import weakref
from typing import Any, Callable

import torch
from torch import nn
from torch.utils import benchmark
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .flops import call_model, dummy_batch, model_flops_per_pair


def median_seconds(fn: Callable[[], Any], min_run_time: float = 1.0, warmup: int = 1,
                   threads: int | None = None) -> float:
    """Median wall time of ``fn()`` by ``torch.utils.benchmark`` (blocked
    autorange), after ``warmup`` untimed calls, on ``threads`` CPU threads
    (default: this process's ``torch.get_num_threads()``, which
    ``OMP_NUM_THREADS`` sets)."""
    for _ in range(warmup):  # first calls allocate, pick kernels, compile, record CUDA graphs
        fn()
    # The timer's own default is one thread, whatever the process runs on: say it.
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads or torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4


def keep_freed_memory() -> bool:
    """Make this process keep the CPU memory it frees for its next
    allocations instead of returning it to the system (glibc's
    ``mallopt``). Returns False where that cannot be set (not Linux, not
    glibc), changing nothing.

    Why: by default glibc hands large freed blocks back to the system and
    page-faults them in again on the next allocation. A CPU forward pass
    allocates and frees tensors of many sizes, so whether it pays those
    faults depends on the sizes and the order of the calls, and a timing
    moves with them from one round, or one arm, to the next. Keeping freed
    memory (what the jemalloc/tcmalloc setups of PyTorch's CPU tuning
    guides achieve) times the computation instead. The process's memory
    then stays near its peak."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # No block of its own from mmap (such blocks go back to the system when freed; with none allowed, glibc grows
    # its heap instead, by mmap where brk cannot), the heap's top trimmed only past 2 GiB free, and grown 256 MiB
    # at a time.
    return all(mallopt(param, value) == 1 for param, value in
               ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 1 << 28)))


def matmul_gflops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, n: int = 1024,
                  min_run_time: float = 1.0) -> float:
    """Achieved GFLOP/s of an ``n x n`` matmul: this machine's practical ceiling."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def run():
        a @ b
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    return 2 * n**3 / median_seconds(run, min_run_time) / 1e9


class _LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of tensors created inside the mode that are still alive."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._seen:
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._release, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """Peak bytes of tensors allocated while ``fn()`` runs (weights excluded).

    On CUDA this is the allocator's own peak; on CPU, a dispatch-level count
    of the tensors the call creates that are alive at the same time.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    mode = _LiveTensorBytes()
    with mode:
        fn()
    return mode.peak


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"fp32"``, ``"bf16"``, ``"fp16"`` (or a ``torch.dtype``) -> ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def compile_for_inference(model: nn.Module, device: torch.device | str, batch: int):
    """``torch.compile`` for timing: shapes are static (one graph per batch
    size), and on CUDA at small batches ``reduce-overhead`` replays the whole
    forward as a CUDA graph, so that launch overhead does not hide the model."""
    cuda_graphs = torch.device(device).type == "cuda" and batch <= 8
    return torch.compile(model, dynamic=False, mode="reduce-overhead" if cuda_graphs else None)


def profile_model(model: nn.Module, frames: int, text_len: int, batch: int = 64, device: str | torch.device = "cpu",
                  dtype: str | torch.dtype = torch.float32, min_run_time: float = 1.0,
                  matmul_ref: float | None = None, compile: bool = False) -> dict[str, float]:
    """Cost of scoring (video, text) pairs with ``model`` on ``device``.

    Returns GFLOPs per pair (torch's counter and the analytic formula, None
    for a model without one such as a token-merging patch; for models that
    cache per-item encodings, ``retrieval_gflops`` splits the analytic cost
    into per video, per caption and per pair),
    latency at batch 1 and per pair at a throughput batch of ``batch``,
    peak activation memory, achieved GFLOP/s and its fraction of a same-dtype
    matmul (``matmul_ref`` GFLOP/s; measured here when not given).

    ``dtype`` other than fp32 runs under autocast (``"bf16"``, ``"fp16"``);
    ``compile`` times ``torch.compile``'d forwards (``compile_for_inference``;
    the first, compiling call is a warm-up and not timed). FLOPs and peak
    memory are measured on the eager model either way.
    """
    device = torch.device(device)
    dtype = parse_dtype(dtype)
    model = model.to(device).eval()
    flops = model_flops_per_pair(model, frames, text_len)
    try:
        analytic, split = model.analytic_flops(frames, text_len), model.retrieval_flops(frames, text_len)
    except NotImplementedError:  # e.g. a token-merging model: its cost depends on the input, counted only
        analytic, split = None, None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def runner(b: int, compiled: bool = compile):
        inputs = dummy_batch(model, frames, text_len, b, device)
        net = compile_for_inference(model, device, b) if compiled else model

        @torch.inference_mode()
        def run():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                call_model(net, inputs)
            sync()

        return run

    # A compiled model compiles on its first call and, with CUDA graphs,
    # records the graph on a later one: neither belongs in the timing.
    warmup = 3 if compile else 1
    t1 = median_seconds(runner(1), min_run_time, warmup)
    tb = median_seconds(runner(batch), min_run_time, warmup)
    peak = peak_memory_bytes(runner(batch, compiled=False), device)
    ref = matmul_ref if matmul_ref is not None else matmul_gflops(device, dtype, min_run_time=min_run_time)
    achieved = flops * batch / tb / 1e9
    return {
        "gflops_per_pair": flops / 1e9,
        "gflops_per_pair_analytic": None if analytic is None else analytic / 1e9,
        "latency_ms_batch1": t1 * 1e3,
        "latency_ms_per_pair": tb / batch * 1e3,
        "throughput_pairs_per_s": batch / tb,
        "peak_activation_mb": peak / 2**20,
        "achieved_gflops_per_s": achieved,
        "matmul_gflops_per_s": ref,
        "fraction_of_matmul": achieved / ref,
        "batch": batch,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "compiled": bool(compile),
        "params": sum(p.numel() for p in model.parameters()),
        # Cached retrieval (multi/mixed streams): per video, per caption and per pair from the caches.
        "retrieval_gflops": None if split is None else {k: v / 1e9 for k, v in split.items()},
    }

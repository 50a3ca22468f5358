"""Compute accounting: FLOPs (torch's counter + analytic), latency, memory."""
from .flops import count_flops, dummy_batch, dummy_inputs, model_flops_per_pair
from .measure import keep_freed_memory, matmul_gflops, median_seconds, peak_memory_bytes, profile_model

__all__ = ["count_flops", "dummy_batch", "dummy_inputs", "model_flops_per_pair", "keep_freed_memory", "matmul_gflops",
           "median_seconds", "peak_memory_bytes", "profile_model"]

"""Tests for slimvl.bench: counted vs analytic FLOPs, attention counting, memory, profiling."""

import platform
import shutil
import subprocess
import sys

import pytest
import torch

from slimvl import create_model
from slimvl.bench import count_flops, dummy_inputs, model_flops_per_pair, peak_memory_bytes, profile_model
from slimvl.nn import Attention

TINY = dict(dim=32, heads=2, image_size=32, patch_size=8, vocab_size=50, max_text_len=12, embed_dim=16)


def tiny(name: str, **kw):
    torch.manual_seed(0)
    return create_model(name, **{**TINY, **kw}).eval()


@pytest.mark.parametrize("name", ["perceiver_vl_tiny", "single_stream_tiny"])
@pytest.mark.parametrize("frames,text_len", [(1, 5), (2, 12), (4, 7), (8, 1)])
def test_counted_flops_match_analytic(name, frames, text_len):
    """torch's FlopCounter (with the CPU attention kernel registered) agrees with the formula within 5%."""
    m = tiny(name)
    counted = model_flops_per_pair(m, frames, text_len)
    analytic = m.analytic_flops(frames, text_len)
    assert counted > 0
    assert abs(counted - analytic) / analytic < 0.05, (counted, analytic)


def test_median_seconds_times_on_the_process_thread_count():
    from slimvl.bench import median_seconds

    seen = []
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert median_seconds(lambda: seen.append(torch.get_num_threads()), min_run_time=0.01) > 0
        assert set(seen) == {2}  # torch.utils.benchmark would time on one thread
        seen.clear()
        median_seconds(lambda: seen.append(torch.get_num_threads()), min_run_time=0.01, threads=1)
        assert set(seen[1:]) == {1}  # the warm-up call runs outside the timer
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_counted_flops_per_pair_independent_of_batch():
    m = tiny("perceiver_vl_tiny")
    one = model_flops_per_pair(m, 2, 6, batch=1)
    three = model_flops_per_pair(m, 2, 6, batch=3)
    assert three == pytest.approx(one, rel=1e-9)


def test_model_flops_per_pair_restores_train_mode_and_grad_flags():
    m = tiny("single_stream_tiny").train()
    flags = [p.requires_grad for p in m.parameters()]
    model_flops_per_pair(m, 2, 4)
    assert m.training
    assert [p.requires_grad for p in m.parameters()] == flags and all(flags)


@pytest.mark.parametrize("masked", [False, True])
def test_count_flops_includes_attention(masked):
    """Attention(dim=D) over N tokens: Linear layers cost 2*N*D*(D + 2D + D) by hand;
    softmax(QK^T)V adds 2 * 2*N*N*D. The counter must see both."""
    torch.manual_seed(0)
    d, n = 16, 10
    attn = Attention(d, heads=2).eval()
    x = torch.randn(1, n, d)
    mask = torch.ones(1, n, dtype=torch.bool) if masked else None
    mask_kw = {"key_padding_mask": mask} if masked else {}
    linear_only = 2 * n * d * d + 2 * n * d * (2 * d) + 2 * n * d * d
    core = 2 * (2 * n * n * d)
    counted = count_flops(lambda: attn(x, **mask_kw), attn)
    assert counted > linear_only  # SDPA is counted at all
    assert counted == linear_only + core


def test_count_flops_plain_matmul():
    a, b = torch.randn(5, 7), torch.randn(7, 3)
    assert count_flops(lambda: a @ b) == 2 * 5 * 7 * 3


def test_dummy_inputs_shapes():
    m = tiny("perceiver_vl_tiny")
    v, ids, mask = dummy_inputs(m, 3, 7, 2)
    assert v.shape == (2, 3, 3, 32, 32) and v.dtype == torch.float32
    assert ids.shape == (2, 7) and ids.dtype == torch.long and int(ids.max()) < 50
    assert mask.shape == (2, 7) and mask.dtype == torch.bool and bool(mask.all())


def test_peak_memory_at_least_allocated_size():
    n = 1 << 20  # 1M float32 = 4 MiB

    def alloc():
        t = torch.ones(n)
        return t.sum()

    peak = peak_memory_bytes(alloc)
    assert peak >= 4 * n

    def two_alive():
        a = torch.ones(n)
        b = torch.ones(n)
        return a.sum() + b.sum()

    assert peak_memory_bytes(two_alive) >= 8 * n


def test_peak_memory_freed_tensors_do_not_accumulate():
    n = 1 << 18

    def sequential():
        for _ in range(8):
            t = torch.ones(n)
            del t

    peak = peak_memory_bytes(sequential)
    assert 4 * n <= peak < 8 * 4 * n


PROFILE_KEYS = {"gflops_per_pair", "gflops_per_pair_analytic", "latency_ms_batch1", "latency_ms_per_pair",
                "throughput_pairs_per_s", "peak_activation_mb", "achieved_gflops_per_s", "matmul_gflops_per_s",
                "fraction_of_matmul", "batch", "params", "retrieval_gflops", "device", "dtype", "compiled"}


def test_profile_model_keys_and_values():
    m = tiny("perceiver_vl_tiny")
    r = profile_model(m, frames=2, text_len=6, batch=4, min_run_time=0.05, matmul_ref=1.0)
    assert set(r) == PROFILE_KEYS
    assert (r.pop("device"), r.pop("dtype"), r.pop("compiled")) == ("cpu", "float32", False)
    split = r.pop("retrieval_gflops")
    for k, v in r.items():
        assert v > 0, k
    # A joint encoder caches nothing: all its cost is per pair.
    assert split == {"video": 0.0, "text": 0.0, "pair": pytest.approx(r["gflops_per_pair_analytic"])}
    assert r["batch"] == 4
    assert r["params"] == m.num_params()
    assert r["matmul_gflops_per_s"] == 1.0
    assert r["gflops_per_pair_analytic"] == pytest.approx(m.analytic_flops(2, 6) / 1e9)
    assert r["gflops_per_pair"] == pytest.approx(r["gflops_per_pair_analytic"], rel=0.05)
    # throughput and per-pair latency describe the same measurement
    assert r["throughput_pairs_per_s"] == pytest.approx(1e3 / r["latency_ms_per_pair"], rel=1e-6)
    assert r["fraction_of_matmul"] == pytest.approx(r["achieved_gflops_per_s"] / 1.0)


def test_training_flops_same_for_fused_and_math_attention():
    """Forward + backward through the CPU fused kernel is counted like the plain-matmul (math) path,
    so the registered backward formula is consistent with autograd of two bmm's."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    attn = Attention(16, heads=2)
    x = torch.randn(2, 10, 16)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 7:] = False

    def step():
        attn(x, key_padding_mask=mask).sum().backward()

    fused = count_flops(step)
    with sdpa_kernel(SDPBackend.MATH):
        math_path = count_flops(step)
    forward = count_flops(lambda: attn(x, key_padding_mask=mask), attn)
    assert fused == math_path
    assert fused > 2 * forward  # the backward pass adds more than another forward


# torch.compile on the CPU generates C++: it needs a compiler (gcc and the Python headers).
needs_compiler = pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler")


@needs_compiler
@pytest.mark.parametrize("name,extra", [("perceiver_vl_tiny", {"cross_attn_drop": 0.5}), ("single_stream_tiny", {})])
def test_compiled_model_matches_eager_on_cpu(name, extra):
    from slimvl.bench.measure import compile_for_inference

    m = tiny(name, **extra)
    video, ids, mask = dummy_inputs(m, 2, 6, 3)
    mask[0, 4:] = False
    compiled = compile_for_inference(m, "cpu", 3)
    with torch.inference_mode():
        eager, got = m(video, ids, mask).logits, compiled(video, ids, mask).logits
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_bench_cli_times_compiled_bf16_models(capsys):
    import json

    from slimvl.cli import main

    main(["bench", "--model", "perceiver_vl_tiny", "--set", "dim=32", "--set", "heads=2", "--frames", "1",
          "--batch", "1", "--min-run-time", "0.02", "--dtype", "bf16", "--compile", "--device", "cpu"])
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["device"], row["dtype"], row["compiled"]) == ("cpu", "bfloat16", True)
    assert row["text_len"] == 32 and row["latency_ms_batch1"] > 0  # the preset's max_text_len
    # FLOPs are the eager model's: compiling changes speed, not the count.
    m = create_model("perceiver_vl_tiny", dim=32, heads=2)
    assert row["gflops_per_pair_analytic"] == pytest.approx(m.analytic_flops(1, 32) / 1e9)


def test_bench_refuses_text_longer_than_a_model_takes(capsys):
    from slimvl.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "--model", "single_stream_tiny", "--text-len", "40", "--min-run-time", "0.02"])
    assert e.value.code == 2 and "L<=32" in capsys.readouterr().err


def test_ratios_and_differences_against_the_matching_baseline():
    from slimvl.bench.report import add_differences, add_ratios

    rows = [{"model": "base", "frames": 4, "s": 2.0, "acc": 0.5}, {"model": "new", "frames": 4, "s": 1.0, "acc": 0.6},
            {"model": "base", "frames": 8, "s": 8.0, "acc": 0.4}, {"model": "new", "frames": 8, "s": 2.0, "acc": None},
            {"model": "new", "frames": 16, "s": 3.0, "acc": 0.1}]
    is_base = lambda r: r["model"] == "base"  # noqa: E731
    add_ratios(rows, is_base, {"s": "s_ratio"}, by=["frames"])
    add_differences(rows, is_base, {"acc": "acc_gain"}, by=["frames"])
    assert [r.get("s_ratio") for r in rows] == [1.0, 0.5, 1.0, 0.25, None]  # 16 frames: no baseline, no ratio
    assert [r.get("acc_gain") for r in rows] == [0.0, pytest.approx(0.1), 0.0, None, None]  # no value, no gain
    add_ratios(rows, rows[1], {"s": "vs_first_new"})
    assert [r["vs_first_new"] for r in rows] == [2.0, 1.0, 8.0, 2.0, 3.0]


_FAULTS = """
import resource, torch
from slimvl.bench.measure import keep_freed_memory
def faults(steps):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        torch.ones(16 << 20)  # 64 MiB: allocated, touched, freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
default = faults(20)
kept = keep_freed_memory()
faults(20)  # the heap settles (it may place the first few blocks on fresh pages)
print(default, kept, faults(20), (64 << 20) // resource.getpagesize())
"""


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_keep_freed_memory_stops_page_faults_on_reallocation():
    """By default glibc returns a freed 64 MiB block to the system and
    faults it in again page by page on the next allocation; once freed
    memory is kept, allocating it again costs no faults."""
    out = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, check=True).stdout.split()
    default, kept, after, pages = int(out[0]), out[1] == "True", int(out[2]), int(out[3])
    assert kept
    assert default > 20 * pages // 2, default  # every allocation faults in most of its pages
    assert after < 20 * pages // 100, after

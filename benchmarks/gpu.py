"""Speed on the hardware: every model family's base preset trained and
served, eager and compiled, next to its baseline and to a matmul.

    python benchmarks/gpu.py [--out benchmarks/out] [--device cuda] [--dtype bf16] [--quick]

Made for a GPU (bf16, ``torch.compile``); it runs anywhere (``--device cpu
--dtype fp32 --quick`` checks it in seconds). Per model and input:

- **training step**: median time of forward, backward and optimizer step
  (AdamW, fused on CUDA; LayerDrop's decisions drawn before the step, as the
  training loop does) on ``--train-batch`` random inputs, with a stand-in
  loss (the mean square of the model's scores: the model's cost, not a
  task's); achieved TFLOP/s from torch's FLOP counter over the whole step;
- **serving**: latency at batch 1 and time per sample at ``--batch``
  (``slimvl.bench.profile_model``; compiled: CUDA graphs at batch 1);
- every time as a ratio to its baseline in the same run (the single-stream
  cross-encoder for Perceiver-VL and its variants and for the dual encoder;
  unmerged CLIP for ToMe and CrossGET; early fusion for MBT and LoCoMT),
  and every throughput as a fraction of a same-dtype matmul's;
- **the demo's training loop**: time per step of ``slimvl.train`` with the
  demo's model and recipe on a small synthetic dataset (steady state: the
  second half of the steps), on the device in each mode (compiled:
  ``TrainConfig(compile=True)``) and eager on the CPU with 2 threads (the
  "GPU against 2 CPU cores" figure).

Writes gpu.json, gpu.md and gpu.png under --out.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

import slimvl
from slimvl.bench import count_flops, dummy_batch, matmul_gflops, profile_model
from slimvl.bench.flops import call_model
from slimvl.bench.measure import median_seconds, parse_dtype
from slimvl.bench.plots import figure
from slimvl.bench.report import add_ratios, markdown_table, write_report
from slimvl.experiments import parse_options
from slimvl.merge import patch
from slimvl.models import DualEncoder, create_model
from slimvl.recipes import MODELS as DEMO_MODELS
from slimvl.runtime import resolve_device

# (name, preset, overrides, build option, baseline name): the input sizes come from the job.
FAMILIES = {
    "video": [("single_stream", "single_stream_{size}", {}, None, "single_stream"),
              ("perceiver_vl", "perceiver_vl_{size}", {}, None, "single_stream"),
              ("perceiver_vl LayerDrop keep 1", "perceiver_vl_{size}", {"cross_attn_keep": 1}, None,
               "single_stream"),
              ("perceiver_vl N/4 latents", "perceiver_vl_{size}", {}, "quarter_latents", "single_stream"),
              ("dual encoder", "single_stream_{size}", {}, "decompose", "single_stream")],
    "image": [("clip", "clip_{size}", {}, None, "clip"),
              ("clip ToMe r=8", "clip_{size}", {}, "tome", "clip"),
              ("clip CrossGET r=8", "clip_{size}", {}, "crossget", "clip"),
              ("single_stream", "single_stream_{size}", {}, None, "single_stream"),
              ("perceiver_vl", "perceiver_vl_{size}", {}, None, "single_stream")],
    "audio+video": [("fusion early", "fusion_early_{size}", {}, None, "fusion early"),
                    ("fusion mbt", "fusion_mbt_{size}", {}, None, "fusion early"),
                    ("fusion locomt", "fusion_locomt_{size}", {}, None, "fusion early")],
}


def build(preset: str, overrides: dict, option: str | None, image_size: int, frames: int):
    """The model of one row (on the CPU, float32)."""
    torch.manual_seed(0)
    size = {"image_size": image_size, "max_frames": max(frames, 1)}
    model = create_model(preset, **size, **overrides)
    if option == "quarter_latents":
        model.active_latents = model.config.num_latents // 4
    elif option == "decompose":
        model = slimvl.decompose(model)
    elif option in ("tome", "crossget"):
        patch(model, option, r=8)
    return model


def _scores(out) -> torch.Tensor:
    """The tensor a stand-in loss reads from any model's output."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    return torch.cat([t.flatten() for t in out if isinstance(t, torch.Tensor)])


def train_step(model, inputs: dict, device: torch.device, dtype: torch.dtype, compiled: bool, backend: str):
    """A function running one training step, and the FLOPs it does."""
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    net = torch.compile(model, backend=backend) if compiled else model
    draw = getattr(model, "draw_step", None)
    encode = getattr(model, "encode_video", None) if isinstance(model, DualEncoder) else None

    def step():
        if draw is not None:
            draw()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            if encode is not None:  # a dual encoder trains its two encoders
                loss = net.encode_video(inputs["video"]).float().square().mean() + \
                    net.encode_text(inputs["text"], inputs["text_mask"]).float().square().mean()
            else:
                loss = _scores(call_model(net, inputs)).float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if draw is not None:
            model.end_step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # allocate the optimizer state (and compile) before counting
    flops = count_flops(step)
    return step, flops


def measure(name: str, model, modality: str, frames: int, image_size: int, a, device, dtype, ref: float,
            text_len: int) -> list[dict]:
    rows = []
    for mode in a.modes:
        compiled = mode == "compiled"
        serve = profile_model(model, frames, text_len, batch=a.batch, device=device, dtype=dtype,
                              min_run_time=a.min_run_time, matmul_ref=ref, compile=compiled)
        inputs = dummy_batch(model, frames, text_len, a.train_batch, device)
        step, flops = train_step(model, inputs, device, dtype, compiled, a.compile_backend)
        seconds = median_seconds(step, a.min_run_time, warmup=2)
        rows.append({"input": modality, "frames": frames, "image_size": image_size, "model": name, "mode": mode,
                     "train_step_ms": seconds * 1e3, "train_tflops_per_s": flops / seconds / 1e12,
                     "train_fraction_of_matmul": flops / seconds / 1e9 / ref,
                     "serve_ms_batch1": serve["latency_ms_batch1"], "serve_ms_per_sample": serve["latency_ms_per_pair"],
                     "serve_fraction_of_matmul": serve["fraction_of_matmul"], "gflops": serve["gflops_per_pair"]})
        model.cpu()
    return rows


def demo_step_ms(device: torch.device, steps: int, root: Path, threads: int | None,
                 compile_: bool) -> tuple[float, list[float]]:
    """Milliseconds per step of the demo's training loop (its model and
    recipe), in the second half of ``steps`` (after allocation and, when
    compiled, compilation), from the loop's own clock; and the loss curve."""
    from slimvl.data import make_dataset
    from slimvl.pipeline import load_split, load_tokenizer
    from slimvl.recipes import DATA, FRAMES, MODELS, TEXT_LEN, TRAIN
    from slimvl.train import train

    data_root = make_dataset(root, **{**DATA, "n_train": 64, "n_val": 8, "n_test": 8}, progress=False)
    tok = load_tokenizer(data_root)
    data = load_split(data_root, "train", tok, FRAMES, DATA["size"], TEXT_LEN, progress=False)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        model = create_model(MODELS[0], vocab_size=tok.vocab_size, max_text_len=TEXT_LEN)
        cfg = replace(TRAIN, steps=steps, device=str(device), log_every=1, compile=compile_)
        history = train(model, data, cfg, progress=False).history
        mid, last = history[steps // 2 - 1], history[-1]
        return (last["seconds"] - mid["seconds"]) / (last["step"] - mid["step"]) * 1e3, [h["loss"] for h in history]
    finally:
        torch.set_num_threads(before)


def main(argv: list[str] | None = None) -> dict:
    a, command = parse_args(argv)
    device, dtype = resolve_device(a.device), parse_dtype(a.dtype)
    ref = matmul_gflops(device, dtype, n=a.matmul_n, min_run_time=a.min_run_time)
    size = "tiny" if a.quick else "base"
    jobs = [("video", t, a.video_size) for t in a.frames] + [("image", 1, a.image_size), ("audio+video", 8, 224)]
    if a.quick:
        jobs = [("video", a.frames[0], 32), ("image", 1, 32), ("audio+video", 2, 32)]
    rows = []
    for modality, frames, image_size in tqdm([] if a.demo_only else jobs, desc="gpu", disable=a.quiet):
        for name, preset, overrides, option, _ in FAMILIES[modality]:
            model = build(preset.format(size=size), overrides, option, image_size, frames)
            rows += measure(name, model, modality, frames, image_size, a, device, dtype, ref, a.text_len)
    baseline_of = {(m, n): b for m, fam in FAMILIES.items() for n, *_, b in fam}
    for r in rows:
        base = next(b for b in rows if (b["input"], b["frames"], b["mode"]) == (r["input"], r["frames"], r["mode"])
                    and b["model"] == baseline_of[r["input"], r["model"]])
        r["baseline"] = base["model"]
    add_ratios(rows, lambda r: r["model"] == r["baseline"],
               {"train_step_ms": "train_vs_baseline", "serve_ms_batch1": "batch1_vs_baseline",
                "serve_ms_per_sample": "per_sample_vs_baseline", "gflops": "gflops_vs_baseline"},
               by=["input", "frames", "mode", "baseline"])
    demo = None
    if not a.no_demo:
        folder = Path(a.out) / "gpu_demo_data"
        demo, curves = {}, {}
        for mode in a.modes:
            demo[f"device_{mode}_ms_per_step"], curves[mode] = demo_step_ms(device, a.demo_steps, folder, None,
                                                                             mode == "compiled")
        demo["cpu2_ms_per_step"], _ = demo_step_ms(torch.device("cpu"), a.demo_steps, folder, 2, False)
        demo["losses"] = curves
        demo["device_ms_per_step"] = min(v for k, v in demo.items() if k.startswith("device_"))
        demo["speedup"] = demo["cpu2_ms_per_step"] / demo["device_ms_per_step"]
    cols = [("input", "input", "s"), ("frames", "frames", "d"), ("image_size", "px", "d"), ("model", "model", "s"),
            ("mode", "mode", "s"), ("gflops_vs_baseline", "GFLOPs vs base", ".2f"),
            ("train_step_ms", "train step ms", ".2f"), ("train_vs_baseline", "vs base", ".2f"),
            ("train_fraction_of_matmul", "train of matmul", ".2f"), ("serve_ms_batch1", "b=1 ms", ".2f"),
            ("batch1_vs_baseline", "vs base", ".2f"), ("serve_ms_per_sample", f"ms/sample b={a.batch}", ".3f"),
            ("per_sample_vs_baseline", "vs base", ".2f"), ("serve_fraction_of_matmul", "serve of matmul", ".2f")]
    md = (f"Device {device} ({_device_name(device)}), {a.dtype}; training batch {a.train_batch}, serving batch "
          f"{a.batch}; text {a.text_len} tokens; matmul reference {ref / 1e3:.2f} TFLOP/s "
          f"({a.matmul_n}x{a.matmul_n}). Ratios are against each row's baseline in the same mode, same run.\n\n"
          + (markdown_table(rows, cols) if rows else ""))
    if demo is not None:
        modes = ", ".join(f"{demo[f'device_{m}_ms_per_step']:.1f} ms/step {m}" for m in a.modes)
        md += (f"\nDemo training loop ({DEMO_MODELS[0]}, the demo's recipe, steady state): on {device} {modes}; "
               f"{demo['cpu2_ms_per_step']:.1f} ms/step eager on 2 CPU threads: the device's best is "
               f"{demo['speedup']:.1f}x faster.\n")
        if len(curves) == 2:
            diff = [abs(x - y) for x, y in zip(curves["eager"], curves["compiled"])]
            half = len(diff) // 2
            md += (f"Loss, compiled against eager: largest difference {max(diff[:half]):.2g} over the first "
                   f"{half} steps, {max(diff[half:]):.2g} over the rest; last step {curves['eager'][-1]:.4f} "
                   f"against {curves['compiled'][-1]:.4f}.\n")
    video = [r for r in rows if r["input"] == "video"]
    # Panels for what ran: the video rows' ratios, then the demo loop's speed and loss curves.
    fig, axes = figure(max(1, (2 if video else 0) + (2 if demo is not None else 0)), width=5.5)
    axes = list(axes)
    for ax, key, label in zip(axes[:2] if video else [], ("train_vs_baseline", "batch1_vs_baseline"),
                              ("training step vs single-stream", "batch-1 latency vs single-stream")):
        for (model, mode) in dict.fromkeys((r["model"], r["mode"]) for r in video):
            pts = [r for r in video if (r["model"], r["mode"]) == (model, mode)]
            ax.plot([r["frames"] for r in pts], [r[key] for r in pts], marker="o", label=f"{model} ({mode})")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("frames")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
    if video:
        axes[0].legend(fontsize=6)
    if demo is not None:
        speed, loss = axes[-2:]
        bars = {f"{device.type} {m}": demo[f"device_{m}_ms_per_step"] for m in a.modes}
        bars["cpu x2 eager"] = demo["cpu2_ms_per_step"]
        speed.bar(list(bars), list(bars.values()), color="tab:blue")
        speed.set_ylabel("ms per step (steady state)")
        speed.set_title("demo training loop", fontsize=9)
        for mode, curve in curves.items():
            loss.plot(range(1, len(curve) + 1), curve, label=f"{device.type} {mode}", lw=1)
        loss.set_xlabel("step")
        loss.set_ylabel("training loss")
        loss.set_title("demo loss curve", fontsize=9)
        loss.legend(fontsize=7)
    fig.suptitle(f"speed on {_device_name(device)} ({a.dtype}): ratios to the baseline in the same run")
    fig.tight_layout()
    payload = {"command": command, "args": vars(a), "device_name": _device_name(device),
               "matmul_gflops_per_s": ref, "rows": rows, "demo": demo}
    write_report(a.out, "gpu", payload, md, fig)
    if not a.quiet:
        print(md)
    return payload


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/out", help="folder of the reports")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="bf16", help="autocast dtype")
    p.add_argument("--frames", type=int, nargs="+", default=[8, 16, 32], help="video lengths (224 px)")
    p.add_argument("--video-size", type=int, default=224, help="video frame side")
    p.add_argument("--image-size", type=int, default=384, help="image side of the image row")
    p.add_argument("--text-len", type=int, default=32, help="text tokens")
    p.add_argument("--batch", type=int, default=64, help="serving throughput batch")
    p.add_argument("--train-batch", type=int, default=64, help="training batch")
    p.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"],
                   help="eager and/or torch.compile'd")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the training step")
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds each timing runs for")
    p.add_argument("--matmul-n", type=int, default=4096, help="side of the reference matmul")
    p.add_argument("--demo-steps", type=int, default=60, help="steps of the demo loop per device and mode "
                   "(the second half is timed)")
    p.add_argument("--no-demo", action="store_true", help="skip the demo training-loop timing")
    p.add_argument("--demo-only", action="store_true", help="only the demo training-loop timing")
    p.add_argument("--quick", action="store_true", help="tiny presets at 32 px, short timings (a smoke run)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or table on stdout")
    a, command = parse_options(p, "gpu.py", argv)
    if a.quick:
        a.min_run_time, a.batch, a.train_batch, a.matmul_n, a.demo_steps = 0.05, 4, 4, 256, 4
    return a, command


if __name__ == "__main__":
    main()

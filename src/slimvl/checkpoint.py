"""Checkpoints as safetensors + JSON, written atomically, never unpickled.

A checkpoint is a folder::

    step_0000200/
      model.safetensors      weights
      optimizer.safetensors  optimiser tensors (flattened state) + RNG state
      tokenizer.json         the tokenizer the model was trained with (when known)
      meta.json              format tag, model config, train config, step,
                             optimiser hyper-parameters, tokenizer and data
                             fingerprints, file sizes

The folder is written under a temporary name and renamed into place, so a
run killed mid-write leaves the previous checkpoint intact (and the next run
removes the temporary). A checkpoint whose weights are not finite is refused
at load: it could only produce NaN scores.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .files import atomic_write_json, atomic_write_text, remove_stale_temporaries  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from .data.tokenizer import Tokenizer

FORMAT = "slimvl-checkpoint"
# 2: Perceiver-VL's encoder and decoder became submodules (parameter names changed).
VERSION = 2
# Config fields that choose what runs at inference, not what the weights are.
_INFERENCE_ONLY = {"cross_attn_keep", "active_latents"}


class CheckpointError(ValueError):
    """A checkpoint that is not ours, is damaged, or does not fit the model."""


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, st in state["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"state.{idx}.{key}"] = val.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = val
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, val in tensors.items():
        if name.startswith("state."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = val
    for name, val in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = val
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    extra: dict | None = None, tokenizer: "Tokenizer | None" = None) -> Path:
    """Save ``model`` (and optionally the optimiser and RNG state) to ``folder`` atomically.

    ``extra`` is JSON data stored in meta.json (step, configs, ...);
    ``tokenizer``, the tokenizer the model's token ids come from, is kept
    beside the weights so that evaluation uses the same one.
    """
    folder = Path(folder)
    remove_stale_temporaries(folder.parent, "step_*")
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"))
        meta: dict[str, Any] = {"format": FORMAT, "version": VERSION, "config": model.config.to_dict(),
                                **(extra or {})}
        if callable(getattr(model, "merge_config", None)):  # a token-merging patch (slimvl.merge) is kept
            meta["merge"] = model.merge_config()
        if optimizer is not None:
            tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
            tensors["rng.torch"] = torch.get_rng_state()
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            meta["optimizer"] = opt_meta
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer.json")
            meta["tokenizer"] = {"vocab_size": tokenizer.vocab_size, "fingerprint": tokenizer.fingerprint}
        meta["files"] = {p.name: p.stat().st_size for p in tmp.iterdir()}
        atomic_write_json(tmp / "meta.json", meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk or Ctrl-C leaves nothing half-written
        raise
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def read_meta(folder: Path) -> dict:
    """Read and check a checkpoint's meta.json; raise ``CheckpointError`` if it is not ours."""
    folder = Path(folder)
    path = folder / "meta.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: not a slimvl checkpoint (no meta.json)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path}: not a slimvl checkpoint (format is {found!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {meta.get('version')} is not supported (expected {VERSION})")
    for name, size in meta.get("files", {}).items():
        f = folder / name
        if not f.is_file() or f.stat().st_size != size:
            raise CheckpointError(f"{f}: missing or truncated (expected {size} bytes)")
    return meta


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors ({e})") from None


def check_finite(weights: dict[str, torch.Tensor], source: str | Path) -> None:
    """Raise ``CheckpointError`` if any floating-point tensor holds NaN or
    infinity: such weights can only give non-finite scores, which would
    rank arbitrarily (and used to look like perfect recall)."""
    bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{source}: {len(bad)} weight tensors hold NaN or infinite values, e.g. {bad[:5]}; "
                              "the checkpoint is damaged or was saved after training diverged")


def load_weights(folder: Path, model: nn.Module) -> dict:
    """Load a checkpoint's weights into ``model``; refuse one from another config.

    Returns the checkpoint's meta data.
    """
    folder = Path(folder)
    meta = read_meta(folder)
    from .models import config_from_dict

    try:  # fields added since the checkpoint was written take their defaults
        saved = config_from_dict(meta["config"]).to_dict()
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{folder}: invalid model config ({e})") from None
    ours = model.config.to_dict()
    diff = sorted(k for k in set(saved) | set(ours) if k not in _INFERENCE_ONLY and saved.get(k) != ours.get(k))
    if diff:
        raise CheckpointError(f"{folder}: checkpoint was saved from another config (differs in {diff})")
    weights = _load_tensors(folder / "model.safetensors")
    check_finite(weights, folder)
    own = model.state_dict()
    bad = sorted(k for k in set(own) | set(weights)
                 if k not in own or k not in weights or own[k].shape != weights[k].shape)
    if bad:
        raise CheckpointError(f"{folder}: weights do not fit the model; offending keys: {bad[:20]}")
    model.load_state_dict(weights)
    return meta


def load_training_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore weights, optimiser state and torch's RNG from ``folder``; returns meta."""
    meta = load_weights(folder, model)
    if "optimizer" not in meta:
        raise CheckpointError(f"{folder}: has no optimiser state, cannot resume from it")
    tensors = _load_tensors(Path(folder) / "optimizer.safetensors")
    torch.set_rng_state(tensors.pop("rng.torch"))
    optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    return meta


def load_model(folder: Path, device: str | torch.device = "cpu") -> nn.Module:
    """Build the model a checkpoint describes and load its weights (and
    patch it for token merging when it was saved patched)."""
    from .models import build_model

    meta = read_meta(folder)
    try:
        model = build_model(meta["config"])
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{folder}: invalid model config ({e})") from None
    load_weights(folder, model)
    if meta.get("merge"):  # trained with token merging: evaluated with it (slimvl.merge.unpatch undoes it)
        from .merge import patch

        try:
            patch(model, **meta["merge"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{folder}: invalid token-merging settings in meta.json ({e})") from None
    return model.to(device)


def load_tokenizer_of(folder: Path) -> "Tokenizer | None":
    """The tokenizer a checkpoint was trained with, or None if it kept none
    (checkpoints written by ``train`` without a tokenizer, or older ones)."""
    from .data.tokenizer import Tokenizer

    meta = read_meta(folder)
    path = Path(folder) / "tokenizer.json"
    if "tokenizer" not in meta:
        return None
    tok = Tokenizer.load(path)
    if tok.fingerprint != meta["tokenizer"].get("fingerprint"):
        raise CheckpointError(f"{path}: does not match the fingerprint recorded in meta.json (the file was changed)")
    return tok


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder as given, or a run folder's newest checkpoint
    (a path that is neither is returned as is, for ``read_meta`` to refuse)."""
    path = Path(path)
    if not (path / "meta.json").exists() and (found := latest_checkpoint(path)) is not None:
        return found
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder under ``run_dir/checkpoints``, or None."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step_*") if (p / "meta.json").is_file())
    return done[-1] if done else None


def weights_checksum(module: nn.Module) -> str:
    """sha256 (hex) of ``module.state_dict()``: every key name, dtype, shape
    and raw tensor bytes, in sorted key order. Equal for equal weights on any
    device, different as soon as one value changes."""
    h = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        t = value.detach().to("cpu").contiguous()
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        # Viewed as bytes so that dtypes numpy lacks (bfloat16) hash as they are.
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()

"""Fine-tuning with merging from a trained checkpoint (CrossGET's recipe:
a short run with the merging in place, so the model learns to work on
fewer tokens): ``slimvl train --merge crossget --r 16 --init-from RUN``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .patch import patch

# Weights a merging fine-tune may add to a checkpoint's model: CrossGET's
# cross-token offsets (zero at first: each cross token starts as a copy of
# the token its tower pools, which the other tokens now also attend to).
NEW_WEIGHTS = ("vision_cross", "text_cross")


def model_for_merging(checkpoint: str | Path, method: str, r: Any = 16, r_text: Any = 0,
                      importance_weight: float = 1.0, **overrides: Any):
    """The model of ``checkpoint`` with its weights, patched to merge tokens.

    Args:
        checkpoint: a slimvl checkpoint folder.
        method, r, r_text, importance_weight: as ``slimvl.merge.patch``.
        overrides: config fields to change; only changes that add no
            weights (or only ``NEW_WEIGHTS``) are accepted.

    CrossGET on a CLIP-style model turns its cross tokens on (trained with
    the cross-modal consistency loss, ``cross_weight``): one more token per
    tower, so the model does not start exactly as it was; the fine-tuning
    adapts it. Other missing or unexpected weights are an error naming them.
    """
    from ..checkpoint import _load_tensors, check_finite, read_meta
    from ..models import build_model, config_from_dict

    folder = Path(checkpoint)
    config = config_from_dict(read_meta(folder)["config"])
    if method == "crossget" and hasattr(config, "cross_tokens"):
        overrides = {"cross_tokens": True, **overrides}
    model = build_model(config.replace(**overrides))
    weights = _load_tensors(folder / "model.safetensors")
    check_finite(weights, folder)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    reshaped = sorted(k for k in set(own) & set(weights) if own[k].shape != weights[k].shape)
    if unexpected or reshaped or any(not k.endswith(NEW_WEIGHTS) for k in missing):
        raise ValueError(f"{folder}: its weights do not fit the model to fine-tune (missing {missing}, unexpected "
                         f"{unexpected}, of another shape {reshaped}); a config change may only add "
                         f"{list(NEW_WEIGHTS)}")
    model.load_state_dict(weights, strict=False)
    return patch(model, method, r=r, r_text=r_text, importance_weight=importance_weight)


__all__ = ["model_for_merging", "NEW_WEIGHTS"]

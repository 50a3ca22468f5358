"""Named presets: ``create_model("perceiver_vl_tiny", num_latents=32)``."""
from __future__ import annotations

from typing import Any, Callable

from .base import VLModel
from .config import PerceiverVLConfig, SingleStreamConfig, VLConfig, config_from_dict
from .perceiver_vl import PerceiverVL
from .single_stream import SingleStream

MODEL_CLASSES: dict[str, type[VLModel]] = {"perceiver_vl": PerceiverVL, "single_stream": SingleStream}

# Each preset is a config; the "tiny" pair is matched (width, heads, number
# of self-attention layers) so that demo comparisons are fair.
_PRESETS: dict[str, Callable[[], VLConfig]] = {
    "perceiver_vl_tiny": lambda: PerceiverVLConfig(dim=64, heads=4, num_latents=16, layers="csscss"),
    "single_stream_tiny": lambda: SingleStreamConfig(dim=64, heads=4, depth=4),
    "perceiver_vl_small": lambda: PerceiverVLConfig(dim=256, heads=4, num_latents=64, layers="cssss" * 2),
    "single_stream_small": lambda: SingleStreamConfig(dim=256, heads=4, depth=8),
    # The paper's base shape (N=128, D=768, k=3 blocks of l=4 self-attention layers).
    "perceiver_vl_base": lambda: PerceiverVLConfig(image_size=224, patch_size=32, tubelet=1, max_frames=16,
                                                   vocab_size=30522, max_text_len=40, dim=768, heads=12,
                                                   num_latents=128, layers="cssss" * 3, embed_dim=256),
    "single_stream_base": lambda: SingleStreamConfig(image_size=224, patch_size=32, tubelet=1, max_frames=16,
                                                     vocab_size=30522, max_text_len=40, dim=768, heads=12,
                                                     depth=12, embed_dim=256),
}


def list_models() -> list[str]:
    """Names of the presets ``create_model`` accepts."""
    return sorted(_PRESETS)


def get_config(name: str, **overrides: Any) -> VLConfig:
    """The preset's config with ``overrides`` (config field names) applied."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model {name!r}; available: {list_models()}")
    return _PRESETS[name]().replace(**overrides)


def build_model(config: VLConfig | dict) -> VLModel:
    """Construct the model a config describes."""
    if isinstance(config, dict):
        config = config_from_dict(config)
    return MODEL_CLASSES[config.model_type](config)


def create_model(name: str, **overrides: Any) -> VLModel:
    """Build a named preset, e.g. ``create_model("perceiver_vl_tiny", num_latents=32)``."""
    return build_model(get_config(name, **overrides))

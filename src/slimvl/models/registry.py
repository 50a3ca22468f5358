"""One registration point for models: ``@register_model(ConfigClass,
presets={...})`` on the model class records the class, its config class and
its named presets; ``create_model("perceiver_vl_tiny", num_latents=32)``,
``build_model(config)`` and checkpoints then find it, as does the CLI."""
from __future__ import annotations

from typing import Any, Callable

from .config import VLConfig

MODEL_CLASSES: dict[str, type] = {}
CONFIGS: dict[str, type[VLConfig]] = {}
PRESETS: dict[str, Callable[[], VLConfig]] = {}


def register_model(config_class: type[VLConfig], presets: dict[str, dict[str, Any]] | None = None):
    """Class decorator registering a model under ``config_class.model_type``.

    ``presets`` maps preset names to config fields (``{"my_tiny": {"dim":
    32}}``). A model type or preset name registered twice by different
    classes is an error (it would silently shadow the first).
    """
    def register(cls: type) -> type:
        kind = config_class.model_type
        if kind in MODEL_CLASSES and not _same(MODEL_CLASSES[kind], cls):
            raise ValueError(f"model_type {kind!r} is already registered to {MODEL_CLASSES[kind].__name__}")
        taken = sorted(name for name in presets or {} if name in PRESETS and not _same(PRESETS[name].owner, cls))
        if taken:
            raise ValueError(f"presets {taken} are already registered by another model")
        MODEL_CLASSES[kind], CONFIGS[kind] = cls, config_class
        for name, fields in (presets or {}).items():
            def make(fields=fields) -> VLConfig:
                return config_class(**fields)
            make.owner = cls
            PRESETS[name] = make
        cls.config_class = config_class
        return cls

    return register


def _same(a: type, b: type) -> bool:
    # The same class defined again (a module reloaded, or run as __main__ and
    # imported) may replace itself; another class may not take its name.
    return a is b or (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def config_from_dict(d: dict[str, Any]) -> VLConfig:
    """Rebuild any registered model's config from its ``to_dict()`` form."""
    kind = d.get("model_type")
    if kind not in CONFIGS:
        raise ValueError(f"unknown model_type {kind!r}; known: {sorted(CONFIGS)}")
    return CONFIGS[kind].from_dict(d)


def list_models() -> list[str]:
    """Names of the presets ``create_model`` accepts."""
    return sorted(PRESETS)


def get_config(name: str, **overrides: Any) -> VLConfig:
    """The preset's config with ``overrides`` (config field names) applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; available: {list_models()}")
    return PRESETS[name]().replace(**overrides)


def build_model(config: VLConfig | dict):
    """Construct the model a config (or its dict form) describes."""
    if isinstance(config, dict):
        config = config_from_dict(config)
    if config.model_type not in MODEL_CLASSES:
        raise ValueError(f"unknown model_type {config.model_type!r}; known: {sorted(MODEL_CLASSES)}")
    return MODEL_CLASSES[config.model_type](config)


def create_model(name: str, **overrides: Any):
    """Build a named preset, e.g. ``create_model("perceiver_vl_tiny", num_latents=32)``."""
    return build_model(get_config(name, **overrides))

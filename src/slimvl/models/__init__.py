"""Models: Perceiver-VL, the single-stream baseline, and the preset registry."""
from .base import VLModel, VLOutput
from .config import PerceiverVLConfig, SingleStreamConfig, VLConfig, config_from_dict
from .perceiver_vl import PerceiverVL
from .registry import build_model, create_model, get_config, list_models
from .single_stream import SingleStream

__all__ = ["VLModel", "VLOutput", "VLConfig", "PerceiverVLConfig", "SingleStreamConfig", "config_from_dict",
           "PerceiverVL", "SingleStream", "build_model", "create_model", "get_config", "list_models"]

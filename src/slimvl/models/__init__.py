"""Models: Perceiver-VL, the single-stream baseline, the Perceiver classifier, decomposed dual
encoders (``decompose``), a CLIP dual encoder (``ClipModel``), the audio-video(-text) fusion
classifiers (``FusionModel``: early, late, MBT, LoCoMT), and the registry
(``register_model``) that ``create_model`` and checkpoints read."""
from .base import VLModel, VLOutput
from .clip import ClipConfig, ClipModel
from .config import PerceiverVLConfig, SingleStreamConfig, VLConfig
from .dual import DualEncoder, DualEncoderConfig, decompose
from .fusion import FusionConfig, FusionModel
from .perceiver_cls import PerceiverClassifier, PerceiverClassifierConfig
from .perceiver_vl import PerceiverVL
from .registry import build_model, config_from_dict, create_model, get_config, list_models, register_model
from .single_stream import SingleStream

__all__ = ["VLModel", "VLOutput", "VLConfig", "PerceiverVLConfig", "SingleStreamConfig", "config_from_dict",
           "PerceiverVL", "PerceiverClassifier", "PerceiverClassifierConfig", "SingleStream", "build_model",
           "create_model", "get_config", "list_models", "register_model", "DualEncoder", "DualEncoderConfig",
           "decompose", "ClipModel", "ClipConfig", "FusionConfig", "FusionModel"]

"""slimvl: efficient multimodal transformers.

Quick start::

    import slimvl
    model = slimvl.create_model("perceiver_vl_tiny")
    print(slimvl.list_models())
    dual = slimvl.decompose(slimvl.create_model("single_stream_tiny"))  # a fast dual encoder
"""
from .models import (ClipModel, DualEncoder, PerceiverVL, PerceiverVLConfig, SingleStream, SingleStreamConfig,
                     VLOutput, build_model, create_model, decompose, get_config, list_models)

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "get_config", "build_model", "PerceiverVL", "PerceiverVLConfig",
           "SingleStream", "SingleStreamConfig", "VLOutput", "DualEncoder", "decompose", "ClipModel",
           "__version__"]

"""slimvl: efficient multimodal transformers.

Quick start::

    import slimvl
    model = slimvl.create_model("perceiver_vl_tiny")
    print(slimvl.list_models())
"""
from .models import (PerceiverVL, PerceiverVLConfig, SingleStream, SingleStreamConfig, VLOutput, build_model,
                     create_model, get_config, list_models)

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "get_config", "build_model", "PerceiverVL", "PerceiverVLConfig",
           "SingleStream", "SingleStreamConfig", "VLOutput", "__version__"]

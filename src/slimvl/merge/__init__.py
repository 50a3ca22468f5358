"""Token merging (ToMe and CrossGET) for slimvl models and Hugging Face CLIP.

    import slimvl.merge
    slimvl.merge.patch(model, method="crossget", r=16)
    model.r = 8                      # change it
    slimvl.merge.unpatch(model)      # the original model, exactly

The algorithms are pure functions (``core``): ``bipartite_soft_matching``
(ToMe), ``complete_graph_matching`` with ``guided_importance`` (CrossGET),
each giving a ``Merge`` that merges tokens (size- or importance-weighted
mean, order kept) and carries masks and flags along.
"""
from .core import Merge, bipartite_soft_matching, complete_graph_matching, guided_importance
from .layers import METHODS, TokenState, merge_layer
from .patch import MergeSettings, is_patched, patch, unpatch
from .schedule import Schedule, layer_r

__all__ = ["Merge", "bipartite_soft_matching", "complete_graph_matching", "guided_importance",
           "METHODS", "TokenState", "merge_layer", "MergeSettings", "is_patched", "patch", "unpatch", "Schedule",
           "layer_r"]

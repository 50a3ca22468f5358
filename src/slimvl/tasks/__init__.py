"""Objectives and metrics per task."""
from .retrieval import (PairLayout, contrastive_loss, gumbel_noise, mined_negatives, pair_layout, random_negatives,
                        recall_metrics, similarity_logits, vtm_group_loss)

__all__ = ["PairLayout", "contrastive_loss", "gumbel_noise", "mined_negatives", "pair_layout", "random_negatives",
           "recall_metrics", "similarity_logits", "vtm_group_loss"]

"""Objectives and metrics per task."""
from .retrieval import contrastive_loss, group_pairs, gumbel_noise, recall_metrics, vtm_group_loss

__all__ = ["contrastive_loss", "group_pairs", "gumbel_noise", "recall_metrics", "vtm_group_loss"]

"""Objectives and metrics per task."""
from .retrieval import contrastive_loss, recall_metrics, unit_pairs, vtm_unit_loss

__all__ = ["contrastive_loss", "recall_metrics", "unit_pairs", "vtm_unit_loss"]

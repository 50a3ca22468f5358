"""Video-text retrieval: its data and step batches (``data``), losses
(``losses``), metrics (``metrics``), evaluation (``evaluate``) and training
task (``task``)."""
from .data import RetrievalData, UnitBatch, sample_units, step_batch, unit_batch
from .evaluate import evaluate, score_matrix
from .losses import (PairLayout, contrastive_loss, gumbel_noise, mined_negatives, pair_layout, random_negatives,
                     similarity_logits, vtm_group_loss)
from .metrics import near_duplicate_errors, recall_metrics, retrieval_metrics, t2v_ranks
from .task import RetrievalObjective, RetrievalTask

__all__ = ["RetrievalData", "UnitBatch", "sample_units", "step_batch", "unit_batch", "evaluate", "score_matrix",
           "PairLayout", "contrastive_loss", "gumbel_noise", "mined_negatives", "pair_layout", "random_negatives",
           "similarity_logits", "vtm_group_loss", "near_duplicate_errors", "recall_metrics", "retrieval_metrics",
           "t2v_ranks", "RetrievalObjective", "RetrievalTask"]

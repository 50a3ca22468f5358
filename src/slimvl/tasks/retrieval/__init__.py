"""Video-text retrieval: its data and step batches (``data``), losses
(``losses``, with bi-modal ``hard_negatives``), metrics (``metrics``),
evaluation (``evaluate``, and ``rerank``: a dual encoder's top-k re-scored by
a cross-encoder) and training task (``task``)."""
from .data import RetrievalData, UnitBatch, sample_units, step_batch, unit_batch
from .evaluate import evaluate, score_matrix
from .losses import (PairLayout, contrastive_loss, gumbel_noise, mined_negatives, pair_layout, random_negatives,
                     similarity_logits, vtm_group_loss)
from .metrics import near_duplicate_errors, recall_metrics, retrieval_metrics, t2v_ranks, v2t_ranks
from .rerank import evaluate_reranked, reranked_scores
from .task import RetrievalObjective, RetrievalTask

__all__ = ["RetrievalData", "UnitBatch", "sample_units", "step_batch", "unit_batch", "evaluate", "score_matrix",
           "PairLayout", "contrastive_loss", "gumbel_noise", "mined_negatives", "pair_layout", "random_negatives",
           "similarity_logits", "vtm_group_loss", "near_duplicate_errors", "recall_metrics", "retrieval_metrics",
           "t2v_ranks", "v2t_ranks", "RetrievalObjective", "RetrievalTask", "evaluate_reranked",
           "reranked_scores"]

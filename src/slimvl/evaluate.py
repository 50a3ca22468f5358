"""Retrieval evaluation, the public entry point: ``evaluate(model, data)``.

The code lives with the rest of retrieval in ``slimvl.tasks.retrieval``
(``evaluate``: scoring every pair or from caches; ``metrics``: Recall@K,
median rank, the held-out split). Scores are computed and compared in
float32 whatever the autocast, and non-finite scores stop the evaluation.
"""
from .tasks.base import NonFiniteScores, check_scores
from .tasks.retrieval.evaluate import evaluate, score_matrix
from .tasks.retrieval.metrics import near_duplicate_errors, retrieval_metrics

__all__ = ["evaluate", "score_matrix", "retrieval_metrics", "near_duplicate_errors", "NonFiniteScores",
           "check_scores"]

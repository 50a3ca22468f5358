"""Tasks (what a training step is and how a model is scored) and their
objectives and metrics: retrieval (VTM + contrastive), QA, MLM, classification,
audio-video classification (the fusion models), several at once."""
from .audio_video import AVData, AVTask, evaluate_av, mean_average_precision
from .base import InputsBatch, MultiTask, Task
from .classify import ClassData, ClassTask, class_metrics, evaluate_classifier
from .mlm import MLMTask, evaluate_mlm, mask_tokens
from .qa import QAData, QATask, evaluate_qa, qa_metrics
from .registry import TASKS, TaskEntry, TaskSource, register_task
from .retrieval import (PairLayout, RetrievalData, RetrievalTask, contrastive_loss, gumbel_noise, mined_negatives,
                        pair_layout, random_negatives, recall_metrics, similarity_logits, vtm_group_loss)

__all__ = ["PairLayout", "contrastive_loss", "gumbel_noise", "mined_negatives", "pair_layout", "random_negatives",
           "recall_metrics", "similarity_logits", "vtm_group_loss", "InputsBatch", "Task", "MultiTask", "RetrievalData",
           "RetrievalTask", "QAData", "QATask", "evaluate_qa", "qa_metrics", "MLMTask", "evaluate_mlm", "mask_tokens",
           "TASKS", "TaskEntry", "TaskSource", "register_task", "ClassData", "ClassTask", "class_metrics",
           "evaluate_classifier", "AVData", "AVTask", "evaluate_av", "mean_average_precision"]

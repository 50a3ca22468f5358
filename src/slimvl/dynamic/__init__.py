"""Dynamic query selection: how many latents each input gets at inference.

A Perceiver trained with nested latents (``nested_latents``) works with the
first Q latents for every Q it was trained on. A policy chooses Q per input:
``Fixed`` (one Q for all), ``Cascade`` (the smallest Q first; an input
stops at the first level whose prediction is confident enough, thresholds
calibrated on a validation split to meet an accuracy tolerance or a compute
budget) or ``Learned`` (a small head reads cheap features of the input and
picks its Q before it runs, calibrated the same way). Inputs are grouped by the Q they run at, so one hard input never
makes a whole batch run at full Q.

The Dancette & Cord paper this follows has no public method text or code;
the design is ours (nested "first-Q" training as in MQT-LLaVA and Matryoshka
models; calibrated confidence exits as in Dynamic Perceiver).
"""
from .calibrate import calibrate
from .confidence import CONFIDENCES, confidence
from .policies import Cascade, Fixed, cascade_exits, default_levels
from .learned import Learned, LevelPredictor, fit_learned
from .evaluate import (evaluate_classifier_policy, evaluate_policy, evaluate_qa_policy, evaluate_retrieval_policy,
                       parse_queries)
from .retrieval import VTMInputs, candidate_lists
from .inputs import ClassInputs, QAInputs
from .run import by_level, classifier_levels, level_logits, run_classifier, run_policy

__all__ = ["calibrate", "CONFIDENCES", "confidence", "Cascade", "Fixed", "Learned", "LevelPredictor", "cascade_exits",
           "default_levels", "fit_learned", "by_level", "classifier_levels", "run_classifier", "run_policy",
           "level_logits", "parse_queries", "evaluate_policy", "evaluate_classifier_policy", "evaluate_qa_policy",
           "evaluate_retrieval_policy", "ClassInputs", "QAInputs", "VTMInputs", "candidate_lists"]

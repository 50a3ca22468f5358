"""Data: the synthetic shapes world, dataset writers, standard-layout readers, tokenizer."""

from .make import dataset_is_valid, make_dataset
from .qa import ANSWERS, QUESTION_TYPES, QARecord, answer_vocab, make_qa, read_vqa, scene_questions
from .media import MediaError, normalize, read_image, read_video, write_video
from .readers import Record, VideoTextDataset, read_karpathy, read_msrvtt
from .tokenizer import Tokenizer
from .world import (COLOURS, MOTIONS, SHAPES, SIZES, Obj, Scene, caption, heldout_combos,
                    near_duplicate_group, render, sample_scene)

__all__ = [
    "make_dataset", "dataset_is_valid", "VideoTextDataset", "Record", "read_msrvtt", "read_karpathy",
    "read_video", "read_image", "write_video", "normalize", "MediaError", "Tokenizer",
    "sample_scene", "render", "caption", "near_duplicate_group", "heldout_combos", "Obj", "Scene",
    "SHAPES", "COLOURS", "SIZES", "MOTIONS", "make_qa", "read_vqa", "answer_vocab", "scene_questions", "QARecord",
    "ANSWERS", "QUESTION_TYPES",
]

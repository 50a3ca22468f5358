"""Data: the synthetic shapes world, dataset writers, standard-layout readers, tokenizer."""

from .audio import decode_audio, log_mel, mel_filters, mel_frames, normalise, spectrogram_stats, write_clip
from .audioset import AudioSetClass, AudioSetRecord, read_audioset
from .av_dataset import AudioVideoDataset, read_statements
from .av_world import AVScene, av_labels, sample_av_scene, sample_statement_clip, soundtrack, statement
from .make import dataset_is_valid, make_dataset
from .qa import ANSWERS, QUESTION_TYPES, QARecord, answer_vocab, make_qa, read_vqa, scene_questions
from .media import MediaError, normalize, read_image, read_video, write_video
from .readers import Record, VideoTextDataset, read_karpathy, read_msrvtt
from .tokenizer import Tokenizer
from .world import (COLOURS, MOTIONS, SHAPES, SIZES, Obj, Scene, caption, heldout_combos,
                    near_duplicate_group, render, sample_scene)

# ANSWERS is the question-answering vocabulary (qa); the statements' answers
# are slimvl.data.av_world.ANSWERS.
__all__ = [
    "make_dataset", "dataset_is_valid", "VideoTextDataset", "Record", "read_msrvtt", "read_karpathy",
    "read_video", "read_image", "write_video", "normalize", "MediaError", "Tokenizer",
    "sample_scene", "render", "caption", "near_duplicate_group", "heldout_combos", "Obj", "Scene",
    "SHAPES", "COLOURS", "SIZES", "MOTIONS", "make_qa", "read_vqa", "answer_vocab", "scene_questions", "QARecord",
    "ANSWERS", "QUESTION_TYPES",
    "write_clip", "decode_audio", "log_mel", "mel_filters", "mel_frames", "spectrogram_stats", "normalise",
    "read_audioset", "AudioSetClass", "AudioSetRecord", "AudioVideoDataset", "read_statements",
    "AVScene", "sample_av_scene", "sample_statement_clip", "av_labels", "soundtrack", "statement",
]

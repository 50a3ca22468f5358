"""Questions and answers about the synthetic world, in a VQA-like layout.

Every question is generated from a scene's objects, so its answer is known
exactly: the colour, shape or motion of an object named by a referring
expression that singles it out in its scene ("what colour is the square that
moves left?"), or a count ("how many circles are there?"). Images (one-frame
videos, everything still) get no motion questions.

On disk, next to a dataset made by ``make_dataset``, ``make_qa`` writes::

    qa/{split}_questions.json    {"info", "data_subtype", "questions": [
                                   {"question_id", "video_id" | "image_id", "question"}]}
    qa/{split}_annotations.json  {"info", "data_subtype", "annotations": [
                                   {"question_id", "video_id" | "image_id", "question_type",
                                    "answer_type", "multiple_choice_answer",
                                    "answers": [{"answer", "answer_confidence", "answer_id"}]}]}
    qa/answers.json              the answer vocabulary (a JSON list)
    qa/tokenizer.json            a tokenizer trained on train captions and questions

the layout of VQA v2 (whose question and annotation files ``read_vqa`` also
reads), with ``video_id`` for videos as MSRVTT-QA names them.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..files import remove_stale_temporaries
from . import world as W
from .tokenizer import Tokenizer

QUESTION_TYPES = ("colour", "shape", "count", "motion")
COUNTS = ("0", "1", "2", "3")
ANSWERS = (*W.COLOURS, *W.SHAPES, *W.MOTIONS, *COUNTS)  # the synthetic answer vocabulary
QA_VERSION = 1

_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
           "cross": "crosses", "ring": "rings"}
_THAT = {"left": "that moves left", "right": "that moves right", "up": "that moves up", "down": "that moves down",
         "grows": "that grows", "shrinks": "that shrinks", "still": "that stays still"}
_COUNT_MOTION = {"left": "move left", "right": "move right", "up": "move up", "down": "move down",
                 "grows": "grow", "shrinks": "shrink", "still": "stay still"}
_TEMPLATES = {
    "colour": ("what colour is {ref}?", "what is the colour of {ref}?", "which colour does {ref} have?"),
    "shape": ("what shape is {ref}?", "what kind of shape is {ref}?", "which shape does {ref} have?"),
    "motion": ("how does {ref} move?", "what does {ref} do?", "in which way does {ref} move?"),
}
# The attributes a referring expression may use, per asked attribute.
_REFERRERS = {
    "colour": (("shape",), ("size", "shape"), ("shape", "motion"), ("size", "shape", "motion")),
    "shape": (("colour",), ("size", "colour"), ("colour", "motion"), ("size", "colour", "motion")),
    "motion": (("shape",), ("colour", "shape"), ("size", "colour", "shape")),
}


@dataclass(frozen=True)
class Question:
    """One generated question with its answer and type."""

    question: str
    answer: str
    question_type: str


def _phrase(o: W.Obj, attrs: tuple[str, ...]) -> str:
    words = ["the"] + [getattr(o, a) for a in ("size", "colour") if a in attrs]
    words.append(o.shape if "shape" in attrs else "object")
    if "motion" in attrs:
        words.append(_THAT[o.motion])
    return " ".join(words)


def _refer(rng: np.random.Generator, scene: W.Scene, o: W.Obj, asked: str, with_motion: bool) -> str | None:
    """A referring expression that names ``o`` alone in the scene, or None."""
    options = [a for a in _REFERRERS[asked] if with_motion or "motion" not in a]
    unique = [a for a in options
              if sum(all(getattr(p, k) == getattr(o, k) for k in a) for p in scene.objects) == 1]
    return _phrase(o, unique[int(rng.integers(len(unique)))]) if unique else None


def _count_question(rng: np.random.Generator, scene: W.Scene, with_motion: bool) -> Question:
    kinds = ["shape", "colour", "all"] + (["motion"] if with_motion else [])
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "all":
        q = ("how many objects are there?", "what is the number of objects?")[int(rng.integers(2))]
        return Question(q, str(len(scene.objects)), "count")
    present = [getattr(o, kind) for o in scene.objects]
    values = {"shape": W.SHAPES, "colour": W.COLOURS, "motion": W.MOTIONS}[kind]
    # About a third of the questions ask about something absent: "0" must be learnt too.
    absent = [v for v in values if v not in present]
    pool = absent if absent and rng.random() < 0.35 else present
    value = pool[int(rng.integers(len(pool)))]
    n = present.count(value)
    if kind == "motion":
        return Question(f"how many objects {_COUNT_MOTION[value]}?", str(n), "count")
    target = _PLURAL[value] if kind == "shape" else f"{value} objects"
    q = (f"how many {target} are there?", f"what is the number of {target}?")[int(rng.integers(2))]
    return Question(q, str(n), "count")


def scene_questions(scene: W.Scene, rng: np.random.Generator, n: int, with_motion: bool = True) -> list[Question]:
    """``n`` questions about ``scene``, cycling through the question types
    (colour, shape, count and, for videos, motion) from a random start, so
    that the types stay balanced."""
    types = [t for t in QUESTION_TYPES if with_motion or t != "motion"]
    first = int(rng.integers(len(types)))
    out: list[Question] = []
    for i in range(n):
        kind = types[(first + i) % len(types)]
        if kind == "count":
            out.append(_count_question(rng, scene, with_motion))
            continue
        for _ in range(10):  # an object that some expression singles out (almost always the first)
            o = scene.objects[int(rng.integers(len(scene.objects)))]
            ref = _refer(rng, scene, o, kind, with_motion)
            if ref is not None:
                break
        else:
            out.append(_count_question(rng, scene, with_motion))
            continue
        template = _TEMPLATES[kind][int(rng.integers(len(_TEMPLATES[kind])))]
        out.append(Question(template.format(ref=ref), getattr(o, kind), kind))
    return out


def qa_is_valid(root, questions_per_item: int | None = None) -> bool:
    """True if ``root/qa`` is complete (and made with ``questions_per_item``, when given)."""
    try:
        done = json.loads((Path(root) / "qa" / "DONE").read_text())
    except (OSError, ValueError):
        return False
    return questions_per_item is None or done.get("questions_per_item") == questions_per_item


def make_qa(root, questions_per_item: int = 4, seed: int = 0, overwrite: bool = False) -> Path:
    """Write questions and answers for every item of a synthetic dataset at
    ``root`` (made by ``make_dataset``; its ``world.json`` holds the scenes)
    and return ``root/qa``. A complete folder made with the same options is
    reused; one made with other options is refused (naming them) unless
    ``overwrite``; the new one is built under a temporary name and renamed."""
    root = Path(root)
    world_path = root / "world.json"
    if not world_path.is_file():
        raise FileNotFoundError(f"{world_path}: not found; questions are generated from a synthetic dataset's "
                                "scenes (slimvl data make)")
    if questions_per_item < 1:
        raise ValueError(f"questions_per_item={questions_per_item}: must be >= 1")
    out = root / "qa"
    if qa_is_valid(root, questions_per_item) and json.loads((out / "DONE").read_text()).get("seed") == seed:
        return out
    if out.exists() and not overwrite:
        from .make import param_changes, read_done

        done = read_done(out)
        changes = param_changes(done, {"version": QA_VERSION, "seed": seed, "questions_per_item": questions_per_item}) \
            if done is not None else ""
        what = f"was made with other options ({changes})" if changes else "is not a finished question set"
        raise ValueError(f"{out} {what}; refusing to replace it and its tokenizer: pass --overwrite "
                         "(overwrite=True) to rebuild it")
    remove_stale_temporaries(root, "qa")
    meta = json.loads(world_path.read_text())
    video = (root / "annotations.json").is_file()
    id_key = "video_id" if video else "image_id"
    by_split: dict[str, tuple[list, list]] = {}
    qid = 0
    for item_id, info in meta["items"].items():
        scene = W.Scene.from_dict(info["scene"])
        rng = np.random.default_rng([seed, qid, 4242])  # qid advances by item: independent per item
        media = item_id if video else int(item_id.removeprefix("img"))
        questions, annotations = by_split.setdefault(info["split"], ([], []))
        for q in scene_questions(scene, rng, questions_per_item, with_motion=video):
            questions.append({"question_id": qid, id_key: media, "question": q.question})
            annotations.append({"question_id": qid, id_key: media, "question_type": q.question_type,
                                "answer_type": "number" if q.question_type == "count" else "other",
                                "multiple_choice_answer": q.answer,
                                "answers": [{"answer": q.answer, "answer_confidence": "yes", "answer_id": 1}]})
            qid += 1
    tmp = root / f"qa.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
    except OSError as e:
        raise ValueError(f"cannot write to the dataset folder {root}: {e.strerror or e}") from None
    try:
        info = {"generator": "slimvl.data.qa", "version": QA_VERSION, "seed": seed,
                "questions_per_item": questions_per_item}
        for split, (questions, annotations) in by_split.items():
            (tmp / f"{split}_questions.json").write_text(
                json.dumps({"info": info, "data_subtype": split, "questions": questions}))
            (tmp / f"{split}_annotations.json").write_text(
                json.dumps({"info": info, "data_subtype": split, "annotations": annotations}))
        (tmp / "answers.json").write_text(json.dumps(list(ANSWERS)))
        texts = [q["question"] for q in by_split.get("train", ([], []))[0]]
        texts += _train_captions(root)
        Tokenizer.train(texts or [""]).save(tmp / "tokenizer.json")
        (tmp / "DONE").write_text(json.dumps(info))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written is left behind
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _train_captions(root: Path) -> list[str]:
    from .readers import read_karpathy, read_msrvtt

    read = read_msrvtt if (root / "annotations.json").is_file() else read_karpathy
    return [c for r in read(root, "train") for c in r.captions]


# ---------------------------------------------------------------- reading


@dataclass
class QARecord:
    """One question of a VQA-style split.

    ``media`` is the ``video_id`` or ``image_id`` as written in the file;
    ``answers`` all annotators' answers (VQA v2 has ten, ours one).
    """

    question_id: int
    media: str
    question: str
    answer: str | None = None
    answers: list[str] = field(default_factory=list)
    question_type: str = ""


def _find(folder: Path, split: str, kind: str) -> Path | None:
    exact = folder / f"{split}_{kind}.json"
    if exact.is_file():
        return exact
    # VQA v2's own names, e.g. v2_OpenEnded_mscoco_val2014_questions.json
    found = sorted(folder.glob(f"*{split}*{kind}.json"))
    return found[0] if len(found) == 1 else None


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


def read_vqa(root, split: str, need_answers: bool = True) -> list[QARecord]:
    """Questions (and answers) of one split of a VQA-style layout.

    Looks in ``root/qa`` then ``root`` for ``{split}_questions.json`` and
    ``{split}_annotations.json`` (or VQA v2's file names). Each question names
    its media by ``video_id`` or ``image_id``. ``need_answers=False`` allows a
    split without annotations (answers left None).
    """
    root = Path(root)
    folder = root / "qa" if (root / "qa").is_dir() else root
    qpath = _find(folder, split, "questions")
    if qpath is None:
        raise FileNotFoundError(f"no questions file for split {split!r} in {folder} "
                                f"(expected {split}_questions.json; make one with `slimvl data qa`)")
    questions = _load(qpath).get("questions")
    if not isinstance(questions, list):
        raise ValueError(f"{qpath}: expected a top-level 'questions' list")
    apath = _find(folder, split, "annotations")
    answers: dict[int, dict] = {}
    if apath is not None:
        anns = _load(apath).get("annotations")
        if not isinstance(anns, list):
            raise ValueError(f"{apath}: expected a top-level 'annotations' list")
        for i, a in enumerate(anns):
            if not isinstance(a, dict) or "question_id" not in a or "multiple_choice_answer" not in a:
                raise ValueError(f"{apath}: annotation {i} needs 'question_id' and 'multiple_choice_answer'")
            answers[a["question_id"]] = a
    elif need_answers:
        raise FileNotFoundError(f"no annotations file for split {split!r} in {folder} "
                                f"(expected {split}_annotations.json)")
    out = []
    for i, q in enumerate(questions):
        media = q.get("video_id", q.get("image_id")) if isinstance(q, dict) else None
        if media is None or "question" not in q or "question_id" not in q:
            raise ValueError(f"{qpath}: question {i} needs 'question_id', 'question' and 'video_id' or 'image_id'")
        a = answers.get(q["question_id"])
        if a is None and need_answers:
            raise ValueError(f"{apath}: no annotation for question_id {q['question_id']}")
        out.append(QARecord(int(q["question_id"]), str(media), str(q["question"]),
                            None if a is None else str(a["multiple_choice_answer"]),
                            [str(x["answer"]) for x in a.get("answers", [])] if a else [],
                            str(a.get("question_type", "")) if a else ""))
    return out


def answer_vocab(root, records: list[QARecord] | None = None, top_k: int = 3129) -> list[str]:
    """The answer vocabulary: ``qa/answers.json`` when present, else the
    ``top_k`` most frequent train answers (VQA v2's usual 3,129)."""
    path = Path(root) / "qa" / "answers.json"
    if path.is_file():
        vocab = _load(path)
        if not isinstance(vocab, list) or not all(isinstance(a, str) for a in vocab) or len(set(vocab)) != len(vocab):
            raise ValueError(f"{path}: expected a JSON list of distinct answer strings")
        return vocab
    if records is None:
        records = read_vqa(root, "train")
    counts: dict[str, int] = {}
    for r in records:
        if r.answer is not None:
            counts[r.answer] = counts.get(r.answer, 0) + 1
    return [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]]

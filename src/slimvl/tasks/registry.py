"""One registration point for tasks: each task module registers a
``TaskEntry`` (its name, how to load its data from a dataset folder, how to
build the training task, how to evaluate), and the ``slimvl`` command builds
its ``--task`` choices from ``TASKS``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass
class TaskSource:
    """What a command line gives a task.

    Attributes:
        root: the dataset folder (``--data``).
        tokenizer: the tokenizer the model's ids come from.
        frames: frames sampled per video.
        options: task options given on the command line (``question_types``,
            ``image_data``...), None when not given.
        answers: the answer vocabulary a checkpoint was trained with (QA).
    """

    root: Path
    tokenizer: Any
    frames: int = 4
    skip_bad: bool = False
    progress: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    answers: list[str] | None = None


@dataclass(frozen=True)
class TaskEntry:
    """A task as the command line knows it.

    Attributes:
        name: the ``--task`` name.
        help: one line for ``--help``.
        load: ``(source, split, model_config) -> data`` of one split.
        build: ``(source, train_data, model_config) -> Task`` to train.
        evaluate: ``(model, data, source, device, batch_size, progress) ->
            metrics``, or None when ``slimvl eval`` cannot score the task.
        model_overrides: ``source -> {config field: value}`` the task needs
            (an answer count, an MLM head); the user's ``--set`` wins.
        validation: how ``train(val_data=...)`` wants the validation split.
        qa_tokenizer: the dataset's question-aware tokenizer (``qa/``).
        options: the task options it takes (others are refused).
        data_overrides: ``(source, model_config) -> {config field: value}``
            measured on the training data for the model about to be
            trained (audio normalisation statistics), or None; the user's
            ``--set`` wins.
        text: whether the task reads text (a tokenizer is needed).
        evaluate_policy: ``(model, data, calibration, source, device,
            batch_size, queries: dict) -> metrics`` under a latent policy
            (``slimvl eval --queries``; ``calibration()`` reads the held-out
            split), or None when the task has none yet.
    """

    name: str
    help: str
    load: Callable[..., Any]
    build: Callable[..., Any]
    evaluate: Callable[..., dict] | None = None
    model_overrides: Callable[[TaskSource], dict] = lambda source: {}
    validation: Callable[[Any], Any] = lambda data: data
    qa_tokenizer: bool = False
    options: tuple[str, ...] = ()
    evaluate_policy: Callable[..., dict] | None = None
    data_overrides: Callable[[TaskSource, Any], dict] | None = None
    text: bool = True


TASKS: dict[str, TaskEntry] = {}


def register_task(entry: TaskEntry) -> TaskEntry:
    """Make ``entry`` a ``--task`` of the command line (a name registered
    twice is an error)."""
    old = TASKS.get(entry.name)
    # The same module registering again (reloaded) may replace its entry.
    if old is not None and old is not entry and old.load.__module__ + old.help != entry.load.__module__ + entry.help:
        raise ValueError(f"task {entry.name!r} is already registered")
    TASKS[entry.name] = entry
    return entry

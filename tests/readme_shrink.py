"""Shrinks what the README's commands and snippets do, without changing
their text: datasets of a few dozen items, two training steps, short
timings, compiled graphs captured but run as they are. Used by ``test_readme.py`` in its own process (``apply`` with
pytest's monkeypatch) and, as ``sitecustomize``, in the processes it starts
(``torchrun``)."""
from __future__ import annotations

import functools
from dataclasses import replace

SIZES = dict(n_train=32, n_val=16, n_test=8, frames=4, size=32)
STEPS = 2


def _make_dataset(original):
    @functools.wraps(original)
    def make(root, *args, **kwargs):
        return original(root, *args, **{**kwargs, **SIZES})

    return make


def _train(original):
    @functools.wraps(original)
    def train(model, data, cfg, *args, **kwargs):
        cfg = replace(cfg, steps=min(cfg.steps, STEPS), eval_every=min(cfg.eval_every, 1),
                      checkpoint_every=1, warmup_steps=1, frozen_pretrained_steps=min(cfg.frozen_pretrained_steps, 1),
                      compile_backend="eager")  # graphs captured as written, run as they are: seconds, not minutes
        return original(model, data, cfg, *args, **kwargs)

    return train


def _median_seconds(original):
    @functools.wraps(original)
    def median(fn, min_run_time=1.0, warmup=1, threads=None):
        return original(fn, min(min_run_time, 0.01), warmup, threads)

    return median


def _compile_layers(original):
    @functools.wraps(original)
    def compile_layers(self, mode=None, backend="inductor", dynamic=None):
        return original(self, mode, "eager", dynamic)  # graphs captured, run as they are

    return compile_layers


def patches() -> list[tuple[object, str, object]]:
    """``(module, attribute, replacement)`` triples."""
    import slimvl.bench.measure as measure
    import slimvl.data as data
    import slimvl.data.make as make
    import slimvl.demo as demo
    import slimvl.train as train
    from slimvl.models.base import VLModel

    shrunk_make = _make_dataset(make.make_dataset)
    return [(make, "make_dataset", shrunk_make), (data, "make_dataset", shrunk_make),
            (demo, "make_dataset", shrunk_make),
            (train, "train", _train(train.train)), (demo, "train", _train(train.train)),
            (measure, "median_seconds", _median_seconds(measure.median_seconds)),
            (VLModel, "compile_layers", _compile_layers(VLModel.compile_layers))]


def apply(monkeypatch=None) -> None:
    """Install the patches (through ``monkeypatch`` when given, so they are undone)."""
    for module, name, value in patches():
        if monkeypatch is not None:
            monkeypatch.setattr(module, name, value)
        else:
            setattr(module, name, value)

"""The README is executable truth: every Python block and every command of
its bash blocks runs, as written and in order, in an empty folder, on
shrunken data (``readme_shrink``: a few dozen items, two steps per run)."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import readme_shrink
import torch

from slimvl.cli import main

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
# `make demo` / `make test` are the set-up contract itself (CI runs `make test`).
SKIP = ("make ",)


def blocks(text: str) -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w+)\n(.*?)^```", text, re.S | re.M)]


def commands(code: str) -> list[str]:
    """The command lines of a bash block, comments stripped."""
    out = []
    for line in code.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(shlex.join(words))
    return out


def test_readme_blocks_are_found():
    found = blocks(README.read_text())
    assert {lang for lang, _ in found} == {"python", "bash"}
    assert sum(len(commands(c)) for lang, c in found if lang == "bash") >= 20
    assert all("..." not in c for lang, c in found if lang == "bash"), "a command with '...' cannot run as written"


def _pretrained(folder: Path, tok) -> None:
    """Tiny local ViT and BERT folders where the README expects them."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    vit = transformers.ViTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                                 image_size=64, patch_size=8, layer_norm_eps=1e-5)
    transformers.ViTModel(vit).save_pretrained(folder / "vit")
    vocab = [t for t, _ in sorted(tok.hf.get_vocab().items(), key=lambda kv: kv[1])]
    bert = transformers.BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, intermediate_size=128, max_position_embeddings=64)
    transformers.BertModel(bert).save_pretrained(folder / "bert")
    (folder / "bert" / "vocab.txt").write_text("\n".join(vocab) + "\n")


def test_readme_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    readme_shrink.apply(monkeypatch)
    # Processes the README starts (torchrun) shrink the same way.
    site = tmp_path / "_site"
    site.mkdir()
    tests = str(Path(__file__).parent)
    (site / "sitecustomize.py").write_text(
        f"import sys\nsys.path.insert(0, {tests!r})\nimport readme_shrink\nreadme_shrink.apply()\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    namespace: dict = {"__name__": "readme"}
    ran = 0
    for lang, code in blocks(README.read_text()):
        if lang == "python":
            if "pretrained/vit" in code and not (tmp_path / "pretrained").exists():
                _pretrained(tmp_path / "pretrained", namespace["tok"])
            exec(compile(code, "README.md", "exec"), namespace)
            ran += 1
            continue
        for line in commands(code):
            if line.startswith(SKIP):
                continue
            if "pretrained/" in line and not (tmp_path / "pretrained").exists():
                from slimvl.pipeline import load_tokenizer

                _pretrained(tmp_path / "pretrained", load_tokenizer("datasets/shapes"))
            words = shlex.split(line)
            if words[0] == "slimvl":
                try:
                    main(words[1:])
                except SystemExit as e:
                    pytest.fail(f"README command failed ({e.code}): {line}\n{capsys.readouterr().err[-2000:]}")
            elif words[0] == "torchrun":
                out = subprocess.run([sys.executable, "-m", "torch.distributed.run", *words[1:]], env=env,
                                     capture_output=True, text=True, timeout=600)
                assert out.returncode == 0, f"README command failed: {line}\n{out.stderr[-3000:]}"
                assert len(out.stdout.strip().splitlines()) == 1, out.stdout  # one result line (rank 0)
            else:
                pytest.fail(f"README command of unknown kind: {line}")
            ran += 1
    assert ran >= 25
    # What the tour promised is on disk.
    assert (tmp_path / "runs" / "demo" / "report.md").is_file()
    assert (tmp_path / "datasets" / "shapes" / "qa" / "DONE").is_file()

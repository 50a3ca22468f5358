"""The rooms of slimvl and what each may import (docs/architecture.md,
"Layers"): a module-level import across the rule fails here. Imports inside
functions (late binding, e.g. a task's CLI loader reaching the pipeline) and
typing-only imports are not module-level and not checked."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).parents[1] / "src" / "slimvl"

# Room -> the rooms it may import at module level (itself always allowed).
ALLOWED = {
    "files": set(), "runtime": set(), "nn": set(),
    "data": {"files"},
    "models": {"nn"},
    "checkpoint": {"files"},
    "tasks": {"runtime"},
    "pipeline": {"data", "tasks", "checkpoint"},
    "train": {"tasks", "checkpoint", "files", "runtime"},
    "bench": {"checkpoint", "tasks", "nn"},
    "evaluate": {"tasks"},
    "recipes": {"train"},
    "dynamic": {"tasks", "runtime", "bench"},
    "index": {"checkpoint", "files"},
    "merge": {"models", "nn"},
}
# The command, the demo, the benchmarks' helpers and the package's own __init__ may import anything.
TOP = {"cli", "cli_index", "demo", "experiments", ""}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _module_level(body: list) -> list:
    """The statements that run on import: into try/if/with blocks, not into
    functions or classes' methods, nor `if TYPE_CHECKING:` (typing only)."""
    out = []
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        out.append(node)
        for field in ("body", "orelse", "finalbody", "handlers"):
            inner = getattr(node, field, None)
            if isinstance(inner, list) and not isinstance(node, ast.ClassDef):
                out += _module_level(inner)
    return out


def _module_level_imports(path: Path, src: Path = SRC) -> tuple[str, set[str]]:
    rel = path.relative_to(src.parent).with_suffix("")
    module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
    package = module if rel.name == "__init__" else module.rsplit(".", 1)[0]
    found = set()
    for node in _module_level(ast.parse(path.read_text()).body):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("slimvl"):
                found.add(target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("slimvl")}
    return module, found


def _violations(src: Path) -> list[str]:
    bad = []
    for path in sorted(src.rglob("*.py")):
        module, imports = _module_level_imports(path, src)
        room = _room(module)
        if room in TOP:
            continue
        for target in sorted(imports):
            other = _room(target)
            if other != room and other not in ALLOWED.get(room, set()):
                bad.append(f"{module} imports {target}")
    return bad


def test_every_room_imports_only_what_it_may():
    assert set(ALLOWED) | TOP >= {_room(_module_level_imports(p)[0]) for p in SRC.rglob("*.py")}, \
        "a new room: give it its rule here and in docs/architecture.md"
    assert _violations(SRC) == []


def test_the_checker_sees_a_violation(tmp_path):
    """The rule is not vacuous: nn importing models (relatively or not) is caught, a
    function-level or typing-only import is not."""
    nn = tmp_path / "slimvl" / "nn"
    nn.mkdir(parents=True)
    (nn / "bad.py").write_text("from ..models import create_model\nimport slimvl.tasks\n"
                               "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..train import train\n"
                               "def f():\n    from ..cli import main\n"
                               "try:\n    from ..data import make_dataset\nexcept ImportError:\n    pass\n")
    assert _violations(tmp_path / "slimvl") == ["slimvl.nn.bad imports slimvl.data",
                                                "slimvl.nn.bad imports slimvl.models",
                                                "slimvl.nn.bad imports slimvl.tasks"]


def test_benchmark_scripts_import_without_path_edits():
    """benchmarks/*.py import slimvl's helpers (slimvl.experiments), not each
    other through sys.path edits; each one loads."""
    import importlib.util

    scripts = sorted((SRC.parents[1] / "benchmarks").glob("*.py"))
    assert len(scripts) >= 7
    for path in scripts:
        text = path.read_text()
        assert "sys.path" not in text, f"{path.name} edits sys.path"
        spec = importlib.util.spec_from_file_location(f"benchmark_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert callable(module.main), path.name

"""Writing benchmark results: JSON + markdown + PNG, each atomically."""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import atomic_write_json, atomic_write_text


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu": platform.processor(),
            "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def add_ratios(rows: list[dict], base: dict, ratios: dict[str, str]) -> list[dict]:
    """Give every row ``row[name] = row[key] / base[key]`` for each
    ``key -> name`` of ``ratios``: costs against a baseline measured in the
    same run (absolute times alone mean little on a shared machine)."""
    for r in rows:
        for key, name in ratios.items():
            r[name] = r[key] / base[key]
    return rows


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A markdown table; ``columns`` are ``(key, header, format)``."""
    out = "| " + " | ".join(h for _, h, _ in columns) + " |\n|" + "---|" * len(columns) + "\n"
    for r in rows:
        out += "| " + " | ".join(format(r[k], f) if r.get(k) is not None else "n/a" for k, _, f in columns) + " |\n"
    return out


def write_report(out_dir: str | Path, name: str, payload: dict, markdown: str, figure=None) -> Path:
    """Write ``name.json``, ``name.md`` and (given a matplotlib figure) ``name.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / f"{name}.json", {"machine": machine_info(), **payload})
    atomic_write_text(out / f"{name}.md", markdown)
    if figure is not None:
        tmp = out / f".{name}.tmp.png"
        figure.savefig(tmp, dpi=100)
        tmp.replace(out / f"{name}.png")
    return out

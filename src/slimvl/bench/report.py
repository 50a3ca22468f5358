"""Writing benchmark results: JSON + markdown + PNG, each atomically."""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..checkpoint import atomic_write_json, atomic_write_text


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu": platform.processor(),
            "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def baseline(rows: list[dict], row: dict, is_base: Callable[[dict], bool], by: Sequence[str] = ()) -> dict | None:
    """The row of ``rows`` that ``is_base`` picks and that shares ``row``'s
    values of the keys ``by`` (e.g. the single-stream row at the same frame
    count); None when there is none."""
    return next((b for b in rows if is_base(b) and all(b[k] == row[k] for k in by)), None)


def _compare(rows, base, pairs, by, op) -> list[dict]:
    for r in rows:
        b = base if isinstance(base, dict) else baseline(rows, r, base, by)
        for key, name in pairs.items():
            if b is not None and r.get(key) is not None and b.get(key) is not None:
                r[name] = op(r[key], b[key])
    return rows


def add_ratios(rows: list[dict], base: dict | Callable[[dict], bool], ratios: dict[str, str],
               by: Sequence[str] = ()) -> list[dict]:
    """Give every row ``row[name] = row[key] / base[key]`` for each
    ``key -> name`` of ``ratios``: costs against a baseline measured in the
    same run (absolute times alone mean little on a shared machine).
    ``base`` is the baseline row, or a predicate choosing baseline rows, each
    row then compared with the one sharing its values of ``by``
    (``baseline``). A row without a baseline or a value gets no ratio."""
    return _compare(rows, base, ratios, by, lambda x, b: x / b)


def add_differences(rows: list[dict], base: dict | Callable[[dict], bool], differences: dict[str, str],
                    by: Sequence[str] = ()) -> list[dict]:
    """As ``add_ratios``, with ``row[name] = row[key] - base[key]`` (accuracy
    against a baseline)."""
    return _compare(rows, base, differences, by, lambda x, b: x - b)


def show(row: dict) -> None:
    """Print one result row as it is measured, floats rounded to 4 places
    (a long benchmark's progress in its log)."""
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)


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

"""Figures of the benchmark reports: line plots over result rows (matplotlib,
imported on first use, drawing off-screen)."""
from __future__ import annotations

from typing import Any


def figure(panels: int = 1, width: float = 5.0, height: float = 4.0):
    """A figure with ``panels`` axes side by side: ``(fig, [ax, ...])``."""
    import matplotlib

    matplotlib.use("Agg")  # reports are files; no display is needed or assumed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(width * panels, height), squeeze=False)
    return fig, list(axes[0])


def plot_lines(ax, rows: list[dict], x: str, y: str, by: str | None = None, label: str | None = None,
               style: str = "o-", **axes: Any):
    """Plot ``row[y]`` against ``row[x]``: one line per value of the key
    ``by`` (labelled ``"{by value}"``, or ``label.format(value)`` when
    ``label`` holds ``{}``), else one line labelled ``label``. ``axes`` go to
    ``ax.set`` (``xscale="log"``, ``ylabel=...``); a legend is drawn when a
    line is labelled. Returns ``ax``."""
    groups = {None: rows} if by is None else {}
    if by is not None:
        for r in rows:
            groups.setdefault(r[by], []).append(r)
    for value, rs in groups.items():
        name = label if by is None else (label.format(value) if label and "{}" in label else str(value))
        ax.plot([r[x] for r in rs], [r[y] for r in rs], style, label=name)
    ax.set(**axes)
    if by is not None or label:
        ax.legend(fontsize=8)
    return ax

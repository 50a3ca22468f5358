"""Writing state safely: atomic files, writable-folder checks, and the
clean-up of temporaries that a killed process left behind.

Everything slimvl writes (datasets, checkpoints, reports) is first written
under a temporary name that carries the writer's process id
(``NAME.tmp-<pid>`` or ``.NAME.tmp-<pid>``), then renamed into place. A
process killed mid-write leaves only such a temporary; the next run of the
same command removes the ones whose process is gone.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

_TMP_PID = re.compile(r"\.(?:tmp|old)-(\d+)(?:\.[A-Za-z0-9]+)?$")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file via a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not leave half a file behind
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (indent 2)."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike, stem: str) -> list[Path]:
    """Remove ``folder``'s temporaries of ``stem`` (``stem.tmp-<pid>``,
    ``.stem.tmp-<pid>``, ``stem.old-<pid>``) whose writer process no longer
    runs. ``stem`` is a glob pattern: ``glob.escape`` a literal name. Returns
    what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for pattern in (f"{stem}.tmp-*", f".{stem}.tmp-*", f"{stem}.old-*"):
        for p in folder.glob(pattern):
            m = _TMP_PID.search(p.name)
            if m is None or pid_alive(int(m.group(1))):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def ensure_writable_dir(path: str | os.PathLike, what: str = "folder") -> Path:
    """Create ``path`` if needed and prove that files can be written in it,
    so that a bad output folder fails before any work, not after it.

    Raises ``ValueError`` naming the folder and the reason.
    """
    path = Path(path)
    probe = path / f".write-probe.tmp-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write to the {what} {path}: {e.strerror or e}") from None
    return path

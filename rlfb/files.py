"""Writing files so that a crash at any moment leaves the old content or the new, never a mix.

Every write into a run directory (and into a reward model's output directory) goes through here: a file
or directory is written under a hidden temporary name next to its destination (``.tmp-NAME-PID``),
fsync'ed, then renamed into place; a rename within one file system is atomic. The writer's process id
in the temporary name lets a later writer tell a live writer's temporary from one a killed process left
behind (:func:`remove_abandoned_temporaries`). Light on imports: the config and logging code use it.

Example:
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> write_text_atomically(folder / "notes.txt", "hello\\n")
    >>> (folder / "notes.txt").read_text(), sorted(p.name for p in folder.iterdir())
    ('hello\\n', ['notes.txt'])
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

TEMPORARY_PREFIX = ".tmp-"
# ".tmp-NAME-PID" (being written) or ".tmp-NAME-old-PID" (the replaced version, deleted last).
_TEMPORARY = re.compile(r"^\.tmp-.+-(\d+)$")
_HASH_CHUNK_BYTES = 1 << 20


def temporary_sibling(destination: Path, role: str = "") -> Path:
    """The hidden name next to ``destination`` that this process writes to (``role`` tells two apart)."""
    return destination.parent / f"{TEMPORARY_PREFIX}{destination.name}-{role + '-' if role else ''}{os.getpid()}"


def write_text_atomically(path: str | Path, text: str) -> None:
    """Replace the file ``path`` by ``text`` in one rename: readers see the old file or the new one."""
    path = Path(path)
    temporary = temporary_sibling(path)
    with temporary.open("w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    fsync_directory(path.parent)


def remove_abandoned_temporaries(parent: str | Path) -> list[Path]:
    """Delete the temporaries in ``parent`` whose writing process no longer runs; returns what went.

    A temporary of a live process (another run saving at this moment, or this one) is left alone.
    """
    parent = Path(parent)
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    for path in parent.iterdir():
        match = _TEMPORARY.match(path.name)
        if match is None or process_is_alive(int(match.group(1))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def process_is_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (True when that cannot be told, to stay safe)."""
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill(pid, 0) would send Ctrl-C on Windows; never guess a process dead there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it runs, as another user
        return True
    return True


def sha256_of_file(path: str | Path) -> str:
    """The hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_tree(directory: Path) -> None:
    """Flush every file under ``directory``, and the directories themselves, to disk."""
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as file:
                os.fsync(file.fileno())
        fsync_directory(Path(root))


def fsync_directory(directory: Path) -> None:
    """Make a rename durable; some platforms (Windows) cannot open directories, which is harmless there."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)

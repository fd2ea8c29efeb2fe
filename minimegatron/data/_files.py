"""File-system helpers shared by the data writers (the tokenizer's .model, the dataset's .bin/.idx).

What can be checked about an output path is checked before any work, with a message that names the
path and the fix; what a writer creates (temporary files, missing parent directories) is removed again
when it fails, so a failed run leaves the disk as it found it.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Iterable

__all__ = ["check_output_file", "make_parents", "remove_dirs", "create_temporary", "same_files",
           "check_readable_file", "explained", "write_error"]


def explained(err: OSError, message: str) -> OSError:
    """An OSError of the same class and errno as `err` whose message is `message` (it names the path and
    the fix), so that code that checks the errno still can, and the CLI prints just the message."""
    if err.errno is None:
        return type(err)(message)
    return type(err)(err.errno, message)


def write_error(err: OSError, what: str, flag: str) -> OSError:
    """`err` from writing `what` (e.g. "the dataset out/x.bin/.idx"), explained: the errno's words, the
    file, and what to do (by errno; otherwise: choose a `flag` in a directory you can write)."""
    from minimegatron.errors import os_error_advice

    where = f" ({err.filename})" if getattr(err, "filename", None) else ""
    advice = os_error_advice(err) or f"choose {flag} in a directory you can write"
    return explained(err, f"cannot write {what}: {err.strerror or err}{where}; {advice}")


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a parent we may not search (EACCES): treat it as something that is there
        return True


def check_output_file(path: str | os.PathLike, flag: str, example: str = "NAME") -> None:
    """Raise an OSError subclass with a message if `path` cannot become a file we write.

    `path` must not be a directory; the nearest existing ancestor must be a directory (not a file)
    that we may write into. Nothing is created."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a directory; name a file in it instead, e.g. "
                                f"{flag} {path / example}")
    probe = path.parent
    while not _exists(probe) and probe != probe.parent:
        probe = probe.parent
    try:
        is_dir = probe.is_dir()
    except OSError as err:
        raise PermissionError(f"{flag} {path}: cannot look into {probe} ({err.strerror}); choose a "
                              f"directory you can write") from None
    if not is_dir:
        raise NotADirectoryError(f"{flag} {path}: {probe} is a file, not a directory, so nothing can be "
                                 f"written under it; choose a path in a directory, e.g. "
                                 f"{flag} {probe.parent / 'out' / path.name}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {path}: the directory {probe} is not writable (read-only or no "
                              f"permission); choose a directory you can write, or fix its permissions")


def make_parents(path: str | os.PathLike) -> list[Path]:
    """Create the missing parent directories of `path`; return those this call created, outermost first."""
    missing: list[Path] = []
    parent = Path(path).parent
    while not _exists(parent) and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    created: list[Path] = []
    try:
        for directory in reversed(missing):
            try:
                directory.mkdir()
            except FileExistsError:  # made meanwhile by someone else: not ours to remove
                continue
            created.append(directory)
    except BaseException:
        remove_dirs(created)
        raise
    return created


def remove_dirs(created: Iterable[Path]) -> None:
    """Remove directories make_parents created, innermost first, as far as they are empty."""
    for directory in reversed(list(created)):
        try:
            directory.rmdir()
        except OSError:
            pass


def create_temporary(final: str | os.PathLike) -> tuple[Path, int]:
    """A new, exclusively created temporary file next to `final` (same file system, so os.replace is
    atomic); returns (its path, an open descriptor). The name is unique, so two runs writing the same
    output never write into one temporary file; the mode follows the umask, like a plain open()."""
    final = Path(final)
    while True:
        tmp = final.with_name(f"{final.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def same_files(outputs: Iterable[str | os.PathLike], inputs: Iterable[str | os.PathLike]
               ) -> tuple[Path, Path] | None:
    """The first (output, input) pair that are the same file on disk (hard and soft links included)."""
    existing = {}
    for out in outputs:
        identity = _identity(Path(out))
        if identity is not None:
            existing[identity] = Path(out)
    if not existing:
        return None
    for source in inputs:
        identity = _identity(Path(source))
        if identity in existing:
            return existing[identity], Path(source)
    return None


def check_readable_file(path: Path, what: str, fix: str, directory_fix: str = "pass a file") -> None:
    """Raise a clear error unless `path` is a regular file this process can open for reading.

    `what` names the file's role ("corpus file", "tokenizer model"); `fix` is the advice for a path that
    does not exist, `directory_fix` for one that is a directory."""
    try:
        exists = path.exists()
    except OSError as err:
        raise PermissionError(f"cannot look up {what} {path} ({err.strerror}); fix the permissions of "
                              f"its directory") from None
    if not exists:
        raise FileNotFoundError(f"{what} {path} does not exist; {fix}")
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a directory, not a file; {directory_fix}")
    if not path.is_file():
        raise ValueError(f"{what} {path} is not a regular file (a FIFO, socket or device); pass a regular "
                         f"file")
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise explained(err, f"cannot read {what} {path} ({err.strerror or err}); make it readable "
                        f"(chmod u+r) or pass another file") from None

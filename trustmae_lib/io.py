"""Atomic file writing: a kill or a crash never leaves half a file behind.

Everything the project writes that a later step reads (results, manifests, checkpoints, dataset files) goes
through :func:`atomic_write` -- write to a temporary file in the same folder, ``fsync``, then ``os.replace``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from trustmae_lib.errors import TrustMAEError


def _umask() -> int:
    """The process's umask (read by setting and restoring it; there is no read-only call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator:
    """Open a temporary sibling of ``path`` for writing; on success rename it onto ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was. The file gets the
    permissions a plain ``open`` would give it (``0o666`` less the umask), not ``mkstemp``'s ``0o600``.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.txt"
        >>> with atomic_write(p, "w") as f:
        ...     _ = f.write("hello")
        >>> p.read_text()
        'hello'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, data, indent: int = 2) -> Path:
    """Atomically write ``data`` as pretty, key-sorted JSON (stable bytes for the same data)."""
    with atomic_write(path, "w") as handle:
        json.dump(data, handle, indent=indent, sort_keys=True, default=str)
        handle.write("\n")
    return Path(path)


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


@contextlib.contextmanager
def atomic_directory(out: str | Path) -> Iterator[Path]:
    """Build a folder in a temporary sibling, then rename it onto ``out`` (nothing half-written is visible).

    An existing ``out`` is replaced only if it is a dataset this library wrote (it holds ``dataset.json``) or
    empty; any other folder is refused. On an exception the temporary folder is removed.
    """
    out = Path(out).expanduser().absolute()
    if out.exists() and not (out.is_dir() and ((out / "dataset.json").is_file() or not any(out.iterdir()))):
        raise TrustMAEError(
            f"{out} already exists and is not a dataset written by trustmae_lib (no dataset.json); "
            "choose a new or empty folder"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.{os.getpid()}.old")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

"""Crash-safe file writes: stage every file under a temporary name, then rename them into place.

A write is two steps. :meth:`AtomicWriter.stage` writes the bytes to a hidden temporary file in
the destination's directory and flushes them to disk; :meth:`AtomicWriter.commit` renames every
staged file onto its destination with ``os.replace`` (atomic on POSIX and Windows for a path on
the same filesystem). Until the commit, the previous files are untouched; if anything fails
before or during the commit, the temporaries are removed and the error propagates. Readers thus
see each file either entirely old or entirely new, never half-written.
"""

from __future__ import annotations

import os
import uuid

__all__ = ["AtomicWriter"]


class AtomicWriter:
    """Stage files, then move them all into place. Use as a context manager::

        with AtomicWriter() as w:
            w.stage("dir/a.json", b"...")
            w.stage("dir/b.bin", b"...")
        # committed here; on an exception nothing was replaced that had not been staged
    """

    def __init__(self) -> None:
        self._staged: list[tuple[str, str]] = []  # (temporary path, destination)

    def stage(self, path: str | os.PathLike, data: bytes) -> None:
        """Write ``data`` to a temporary file next to ``path`` and fsync it."""
        path = os.fspath(path)
        directory, name = os.path.split(os.path.abspath(path))
        tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self._staged.append((tmp, path))
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    def commit(self) -> None:
        """Rename every staged file onto its destination, in staging order."""
        while self._staged:
            tmp, path = self._staged[0]
            os.replace(tmp, path)
            self._staged.pop(0)

    def discard(self) -> None:
        """Remove the temporaries not yet committed."""
        for tmp, _ in self._staged:
            try:
                os.remove(tmp)
            except FileNotFoundError:
                pass
        self._staged.clear()

    def __enter__(self) -> "AtomicWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.commit()
            finally:
                self.discard()
        else:
            self.discard()

"""Crash-safe file writes: stage every file under a temporary name, then rename them into place.

A write is two steps. :meth:`AtomicWriter.stage` writes the bytes to a hidden temporary file in
the destination's directory and flushes them to disk; :meth:`AtomicWriter.commit` renames every
staged file onto its destination with ``os.replace`` (atomic on POSIX and Windows for a path on
the same filesystem). Until the commit, the previous files are untouched; if anything fails
before or during the commit, the temporaries are removed and the error propagates. Readers thus
see each file either entirely old or entirely new, never half-written, and an error raised during
the renames puts back the files already replaced, so a failed write changes nothing. (A crash of
the process *between* two renames cannot be undone that way: it can pair a new file with an old
one.)
"""

from __future__ import annotations

import os
import shutil
import uuid

__all__ = ["AtomicWriter"]


def _remove(path: str | None) -> None:
    if path is not None:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _keep(path: str, backup: str) -> str:
    """Keep ``path``'s current contents at ``backup`` (hard link, else a copy); returns ``backup``."""
    try:
        try:
            os.link(path, backup)
        except OSError:
            shutil.copy2(path, backup)
    except BaseException:
        _remove(backup)
        raise
    return backup


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
        """Rename every staged file onto its destination, in staging order, all or nothing.

        Before a destination is replaced, its previous contents are kept under a hidden backup
        name (a hard link, or a copy where links are not supported). If a rename raises, the
        files already replaced get their previous contents back (new destinations are removed),
        so an error leaves the directory as it was; the backups are removed afterwards.
        """
        done: list[tuple[str, str | None]] = []  # (destination, backup of its previous contents)
        try:
            while self._staged:
                tmp, path = self._staged[0]
                backup = _keep(path, f"{tmp}.bak") if os.path.exists(path) else None
                try:
                    os.replace(tmp, path)
                except BaseException:
                    _remove(backup)
                    raise
                done.append((path, backup))
                self._staged.pop(0)
        except BaseException:
            for path, backup in reversed(done):  # best effort: a backup that cannot be put back stays
                try:
                    os.replace(backup, path) if backup is not None else os.remove(path)
                except OSError:
                    pass
            raise
        for _, backup in done:
            _remove(backup)

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

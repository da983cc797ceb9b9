"""Files written so that a crash, a full disk or a read-only folder never leaves half a file and
never surfaces as a traceback.

- ``atomic_write_text`` / ``atomic_torch_save``: write ``<path>.tmp<pid>``, fsync, then
  ``os.replace`` over ``path``; a failure removes the temporary file and leaves ``path`` as it
  was. Any OSError (ENOSPC, EACCES, EROFS, EIO) comes out as an OSError naming ``path``, also
  where torch would raise its own RuntimeError (``torch.save`` reports a failed write as
  "unexpected pos ..." with the OSError only in ``__context__``).
- ``check_writable_dir``: a folder a command will write into, probed with a real write before
  any work starts, so a read-only ``--out`` is found in the first second and not after an
  epoch of training.
- ``os_error_message``: the one line the CLI prints for an OSError (what, which file, what to do).
"""

from __future__ import annotations

import errno
import os
import tempfile
from typing import Any

import torch

from autokd.errors import PipelineError

_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NO_ACCESS = {errno.EACCES, errno.EPERM, errno.EROFS}


def _tmp_path(path: str) -> str:
    return f"{path}.tmp{os.getpid()}"


def _discard(tmp: str) -> None:
    try:
        os.remove(tmp)
    except OSError:
        pass  # never created, or the folder refuses even that: nothing more to clean


def _as_os_error(e: BaseException, path: str) -> OSError | None:
    """The OSError behind ``e`` (itself or, for torch's writer, its context), naming ``path``."""
    err = e if isinstance(e, OSError) else e.__context__
    if not isinstance(err, OSError) or err.errno is None:
        return None
    return OSError(err.errno, err.strerror or os.strerror(err.errno), path)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = os.fspath(path)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        _discard(tmp)
        err = _as_os_error(e, path)
        if err is not None:
            raise err from None
        raise


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` atomically (temporary file, fsync, rename)."""
    path = os.fspath(path)
    tmp = _tmp_path(path)
    try:
        # Through a Python file object: a failed write then raises an OSError (torch's own file
        # writer reports ENOSPC as an unrelated-looking RuntimeError).
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        _discard(tmp)
        err = _as_os_error(e, path)
        if err is not None:
            raise err from None
        raise


def check_writable_dir(path: str, what: str) -> str:
    """Prove that files can be written in folder ``path`` (or, when it does not exist yet, that
    it can be created: a probe file in its nearest existing ancestor), without leaving anything
    behind; PipelineError naming ``what`` (the option, e.g. "--out") otherwise."""
    path = os.path.abspath(os.fspath(path))
    probe_in = path
    while not os.path.exists(probe_in) and os.path.dirname(probe_in) != probe_in:
        probe_in = os.path.dirname(probe_in)
    if not os.path.isdir(probe_in):
        raise PipelineError(f"{what} {path}: {probe_in} is a file, expected a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".autokd-write-probe-", dir=probe_in)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as e:
        where = "the folder" if probe_in == path else f"its parent {probe_in}"
        raise PipelineError(
            f"{what} {path}: {where} is not writable ({e.strerror}); choose "
            "another folder or fix its permissions"
        ) from None
    return path


def os_error_message(e: OSError) -> str:
    """One line for an OSError: the file, the system's words, and what to do."""
    name = e.filename if e.filename is not None else None
    what = e.strerror or str(e)
    head = f"{name}: {what}" if name else what
    if e.errno in _NO_ROOM:
        return (
            f"{head}: the disk is full; free some space and run the same command again "
            "(finished epochs, trials and stores are kept)"
        )
    if e.errno in _NO_ACCESS:
        return f"{head}: not allowed; fix the permissions or choose another folder (--out)"
    if e.errno == errno.ELOOP:
        return f"{head}: a symbolic link that points back at itself; remove or fix it"
    return head

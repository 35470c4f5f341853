"""Atomic file and folder writes (temp file or folder beside the target, fsync, rename). Every layer may import this."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp files are owner-only
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


#: the file an existing output folder must hold to be replaced (ltp_compress.manifest writes it in every
#: checkpoint and export folder)
REPLACEABLE_MARKER = "manifest.json"


def check_output_folder(folder: Path, marker: str = REPLACEABLE_MARKER, fmt: str | None = None) -> None:
    """Refuse (OutputFolderError) an output path that exists and is not replaceable: a file, a folder that is
    neither empty nor one ltp-compress wrote (it holds `marker`), or, with `fmt`, a folder whose manifest names
    another format (an export never replaces a checkpoint). Call it before any work; atomic_folder checks again
    before it replaces anything."""
    from ltp_compress.errors import OutputFolderError

    folder = Path(folder)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise OutputFolderError(f"{folder}: exists and is not a folder; give a new or empty folder (it is not replaced)")
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    if not (folder / marker).is_file():
        raise OutputFolderError(f"{folder}: a folder of other files (no {marker}: not one ltp-compress wrote); "
                                "give a new or empty folder (it is not replaced)")
    if fmt is not None:
        try:
            found = json.loads((folder / marker).read_text(encoding="utf-8")).get("format")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            found = None
        if found != fmt:
            raise OutputFolderError(f"{folder}: holds {'a ' + repr(found) if found else 'an unreadable'} folder, not a {fmt!r} "
                                    "one; give a new or empty folder (it is not replaced)")


@contextlib.contextmanager
def atomic_folder(folder: Path, marker: str = REPLACEABLE_MARKER, fmt: str | None = None):
    """Build `folder` in a temporary sibling (yielded) that is renamed into place only when the block
    completes; an existing `folder` is replaced only then, and only if check_output_folder allows it
    (empty, or holding `marker`). On any error the temporary folder is removed and an existing `folder`
    is left as it was."""
    folder = Path(folder)
    check_output_folder(folder, marker, fmt)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".tmp-{folder.name}-"))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only
        yield tmp
        fsync_dir(tmp)
        old = None
        if folder.exists():
            old = folder.with_name(f".old-{folder.name}-{os.getpid()}")
            folder.rename(old)
        tmp.rename(folder)
        fsync_dir(folder.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

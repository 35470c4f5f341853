"""Folder manifests: `manifest.json` lists every file of a checkpoint or export folder with its size
and sha256, so a loader can refuse a truncated, edited, missing or extra file before it parses
anything. Used by the deployable checkpoint (modeling/deploy.py) and the ONNX export
(modeling/onnx_export/). Light (json, hashlib): no torch.

A manifest detects corruption and accidental edits; it is not a signature: someone who edits a
file and its manifest entry together is not detected.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ltp_compress.errors import CheckpointError
from ltp_compress.fileio import fsync_dir  # noqa: F401 (re-exported for writers of manifest folders)

MANIFEST_FILE = "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path, fmt: str, version: int, extra: dict | None = None) -> dict:
    """Hash every file below `folder` (made world-readable and fsynced), write manifest.json last."""
    folder = Path(folder)
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST_FILE:
            os.chmod(p, 0o644)  # readable by whoever serves the model
            files[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    manifest = {"format": fmt, "format_version": version, "files": files, **(extra or {})}
    with open(folder / MANIFEST_FILE, "w") as f:
        f.write(json.dumps(manifest, indent=2))
        f.flush()
        os.fsync(f.fileno())
    os.chmod(folder / MANIFEST_FILE, 0o644)
    return manifest


def verify_manifest(path: Path, fmt: str, version: int, required: tuple[str, ...], *, error: type[CheckpointError] = CheckpointError,
                    what: str = "checkpoint", missing_hint: str = "") -> dict:
    """Check every file against manifest.json (present, same size, same sha256; no unlisted file);
    returns the manifest. Raises `error` naming the file and what is wrong."""
    path = Path(path)
    if not path.exists():
        raise error(f"{path}: {what} folder not found")
    if not path.is_dir():
        raise error(f"{path}: not a folder (a {what} is a folder with {MANIFEST_FILE})")
    mpath = path / MANIFEST_FILE
    if not mpath.is_file():
        raise error(f"{mpath}: missing: not an ltp-compress {what}{missing_hint}")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
        for name, entry in files.items():
            int(entry["size"]), str(entry["sha256"])
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise error(f"{mpath}: unreadable or malformed manifest ({type(e).__name__}: {e})") from None
    if manifest.get("format") != fmt or manifest.get("format_version") != version:
        raise error(f"{mpath}: unsupported format {manifest.get('format')!r} version {manifest.get('format_version')!r} "
                    f"(this version reads {fmt!r} version {version})")
    for req in required:
        if req not in files:
            raise error(f"{path / req}: not listed in {MANIFEST_FILE} (manifest edited or incomplete)")
    for name, entry in files.items():
        p = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise error(f"{mpath}: invalid file name {name!r} in manifest")
        if not p.is_file():
            raise error(f"{p}: missing (listed in {MANIFEST_FILE})")
        size = p.stat().st_size
        if size != int(entry["size"]):
            state = "truncated" if size < int(entry["size"]) else "larger than recorded"
            raise error(f"{p}: {state}: {size} bytes, manifest says {entry['size']}")
        digest = sha256_file(p)
        if digest != entry["sha256"]:
            raise error(f"{p}: content changed: sha256 {digest[:16]}... does not match the manifest ({str(entry['sha256'])[:16]}...)")
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if p.is_file() and rel != MANIFEST_FILE and rel not in files:
            raise error(f"{p}: not listed in {MANIFEST_FILE} (unexpected file, or manifest edited)")
    return manifest

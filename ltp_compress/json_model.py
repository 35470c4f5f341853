"""Typed JSON files: a pydantic model per on-disk JSON format (ltp.json, ltp_onnx.json, ...), read
and written through these three functions, so every format has one reader and one writer and bad
content raises the caller's UserError naming the file and the field. Every layer may import this."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from ltp_compress.errors import UserError
from ltp_compress.fileio import atomic_write_text

Model = TypeVar("Model", bound=BaseModel)


def _describe(e: ValidationError, limit: int = 3) -> str:
    """The first `limit` problems as "'a.b': message (got value)"."""
    parts = []
    for err in e.errors()[:limit]:
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        got = "" if err["type"] == "missing" else f" (got {repr(err.get('input'))[:80]})"
        parts.append(f"'{loc}': {err['msg']}{got}")
    more = len(e.errors()) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def parse_json_model(cls: type[Model], obj, file: str | Path, error: type[UserError]) -> Model:
    """`obj` (parsed JSON) as `cls`; a missing, unknown or mistyped field raises `error` naming `file` and the field."""
    try:
        return cls.model_validate(obj)
    except ValidationError as e:
        raise error(f"{file}: {_describe(e)}") from None


def load_json(path: Path, error: type[UserError]):
    """The JSON value in `path`; unreadable or invalid JSON raises `error` naming the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise error(f"{path}: not valid JSON: {e}") from None


def read_json_model(path: Path, cls: type[Model], error: type[UserError]) -> Model:
    return parse_json_model(cls, load_json(path, error), path, error)


def write_json_model(path: Path, model: BaseModel) -> None:
    """Atomically write the fields that were set (so a reader's defaults never appear in a file), indent 2."""
    atomic_write_text(Path(path), json.dumps(model.model_dump(mode="json", exclude_unset=True), indent=2))

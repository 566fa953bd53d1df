"""Reading the JSON spec files that the torchrun entry points (``student.train``, ``student.evaluate``) take."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

SpecModel = TypeVar("SpecModel", bound=BaseModel)


def read_json(path: Path, missing: str, error: type[Exception]) -> Any:
    """The parsed JSON file; an ``error`` naming the file when it is missing (``missing`` says what it is) or
    not valid JSON."""
    if not path.is_file():
        raise error(f"{path}: {missing}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON: {exc}") from None


def read_spec(path: str | Path, model: type[SpecModel], what: str, error: type[Exception]) -> SpecModel:
    """``path`` validated as ``model``; every problem is an ``error`` naming the file and each bad field."""
    path = Path(path)
    data = read_json(path, f"{what} spec not found", error)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = [f"{path}: field '{'.'.join(map(str, e['loc']))}': {e['msg']}" for e in exc.errors()]
        raise error(f"invalid {what} spec:\n  " + "\n  ".join(lines)) from None

"""Reading the JSON spec files that the torchrun entry points (``student.train``, ``student.evaluate``) take."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

SpecModel = TypeVar("SpecModel", bound=BaseModel)


def read_spec(path: str | Path, model: type[SpecModel], what: str, error: type[Exception]) -> SpecModel:
    """``path`` validated as ``model``; every problem is an ``error`` naming the file and each bad field."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} spec not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON: {exc}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = [f"{path}: field '{'.'.join(map(str, e['loc']))}': {e['msg']}" for e in exc.errors()]
        raise error(f"invalid {what} spec:\n  " + "\n  ".join(lines)) from None

"""A plan task's `check`: what its output must be for the attempt to count
(pure). "The answer was bad" is why a task escalates, so a bad answer is a
failed attempt like a failed request."""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["check_output"]

_FENCE = re.compile(r"^\s*```[A-Za-z0-9_-]*\s*\n(.*?)\n\s*```\s*$", re.S)


def check_output(check: dict[str, Any] | None, text: str) -> str | None:
    """Why `text` fails `check` ({"regex": ...} or {"json_schema": ...}), in
    one sentence; None when it passes (or there is no check). A JSON answer
    may come in a Markdown code fence, as models like to write it."""
    if not check:
        return None
    if "regex" in check:
        if re.search(check["regex"], text):
            return None
        return f"its output does not match the check's regex {check['regex']!r}"
    fenced = _FENCE.match(text)
    try:
        data = json.loads(fenced.group(1) if fenced else text)
    except json.JSONDecodeError as exc:
        return f"its output is not JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    error = best_match(Draft202012Validator(check["json_schema"]).iter_errors(data))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path)
    return f"its output fails the check's JSON Schema{f' at {where}' if where else ''}: {error.message}"

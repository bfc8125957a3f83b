"""Typed records checked by pydantic: the run and distill configs, the gates and the manifest.

A value of the wrong type is one line naming its key, what was expected and what came, the way
every other bad input is reported."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ConfigDict, TypeAdapter, ValidationError, model_validator

from pipeline.errors import PipelineError

STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")
"""Config records: TOML `num_points = true` or `'8'` is a mistake, never coerced; no NaN or inf."""

_EXPECTED = {
    "int_type": "int",
    "int_parsing": "int",
    "int_from_float": "int",
    "float_type": "a finite number",
    "float_parsing": "a finite number",
    "finite_number": "a finite number",
    "string_type": "str",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "tuple_type": "a list of strings",
    "list_type": "a list",
    "missing": "given",
    "path_type": "a path string",
}


def _expected(error: dict[str, Any]) -> str:
    kind, location = error["type"], error["loc"]
    if kind == "string_type" and any(isinstance(part, int) for part in location):
        return "a list of strings"
    if kind in ("dict_type", "model_type", "dataclass_type"):
        return "a table of options" if len(location) > 1 else "a table"
    if kind == "is_instance_of" and error.get("ctx", {}).get("class") == Path.__name__:
        return "a path string"
    return _EXPECTED.get(kind, error["msg"].lower())


def describe_validation_error(error: ValidationError, prefix: str) -> str:
    """pydantic's first error as `<prefix><key> must be <expected>, got <type> <value>`."""
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"] if not isinstance(part, int)) or "value"
    if first["type"] == "missing":
        return f"{prefix}{key} is missing"
    if first["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        return f"{prefix}{key} is not a known key"
    value = first.get("input")
    return f"{prefix}{key} must be {_expected(first)}, got {type(value).__name__} {value!r}"


def one_line_errors(prefix: str, error_type: type[PipelineError]) -> Any:
    """A wrap model validator for a record class: pydantic's errors raised as `error_type` with
    one line (declared in the class body as `_errors = one_line_errors(...)`)."""

    def validate(cls: type, values: Any, handler: Callable[[Any], Any]) -> Any:
        try:
            return handler(values)
        except ValidationError as error:
            raise error_type(describe_validation_error(error, prefix)) from None

    return model_validator(mode="wrap")(classmethod(validate))


Result = TypeVar("Result")


def read_json(path: Path, what: str, error_type: type[PipelineError] = PipelineError) -> Any:
    """A JSON file's content; one line naming `what` if it is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise error_type(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise error_type(f"{path} is not valid JSON: {error}") from None


def read_result(path: Path, kind: type[Result], what: str) -> Result:
    """A result file a stage wrote (`report.json`, `benchmark.json`, `compat.json`) back as its
    typed record, nested dataclasses included; one line if it is missing or not one."""
    path = Path(path)
    raw = read_json(path, what)
    try:
        return TypeAdapter(kind).validate_python(raw)
    except ValidationError as error:
        raise PipelineError(f"{path} is not a {what}: {describe_validation_error(error, '')}") from None

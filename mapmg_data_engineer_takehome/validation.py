"""A request's JSON body and query parameters validated by their models (models.py), and
pydantic's complaints said as the API's own error codes, one problem in one sentence.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any, Optional, TypeVar, Union

import orjson
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from .errors import ApiError
from .models import (
    MAX_BATCH_WRITES,
    MAX_EVENTS,
    MAX_GRACE_SECONDS,
    MAX_MGET_KEYS,
    MAX_PAGE,
    MAX_TOKEN_RULES,
    MAX_WAIT_SECONDS,
    ChangesQuery,
    ExportQuery,
    ImportQuery,
    ListQuery,
    MgetRequest,
    SetRequest,
    TokenRequest,
    TxnCompare,
    TxnDeleteOperation,
    TxnGetOperation,
    TxnRequest,
    TxnSetOperation,
)
from .rules import LEASE_ID_MAX_CHARS, is_text
from .store.base import MAX_TTL_SECONDS

Model = TypeVar("Model", bound=BaseModel)
# Likely names for "val", each answered with a hint instead of a bare "unknown field".
_VAL_MISSPELLINGS = {"value", "values", "v", "data"}


def parse_body(model: type[Model], body: bytes) -> Model:
    """``body`` validated as ``model``; ApiError (400 or 422) says what is wrong with it."""
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        if error.errors()[0]["type"] != "json_invalid":
            raise api_error(model, error) from None
    # pydantic's parser refuses what Python's json takes: escaped lone surrogates, which are
    # valid JSON but not text. Parsed again here so that such a body is judged by the field
    # rules (422 invalid_string), and malformed JSON is described with line and column.
    document = _loads(body)
    try:
        validated = model.model_validate(document)
    except ValidationError as error:
        raise api_error(model, error) from None
    for path, text in _strings(document, ()):
        if not is_text(text):
            raise ApiError(
                422,
                "invalid_string",
                f"{_subject(path)} contains an unpaired UTF-16 surrogate, which is not text.",
            )
    return validated


def _loads(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body)
    except json.JSONDecodeError as error:
        raise ApiError(
            400,
            "invalid_json",
            f"The request body is not valid JSON: {error.msg} at line {error.lineno} "
            f"column {error.colno} (character {error.pos}).",
        ) from None
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_json", "The request body is not UTF-8 encoded JSON.") from None


def _strings(document: Any, path: tuple[Union[str, int], ...]) -> Iterator[tuple[Any, str]]:
    if isinstance(document, str):
        yield path, document
    elif isinstance(document, dict):
        for name, value in document.items():
            yield from _strings(value, (*path, name))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            yield from _strings(value, (*path, index))


def field_path(location: Sequence[Union[str, int]]) -> str:
    """('items', 3, 'val') → 'items[3].val'."""
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _subject(location: Sequence[Union[str, int]]) -> str:
    """How a message names a field: "Field 'val'" at the top, "items[3].val:" in a batch."""
    if len(location) <= 1:
        return f"Field '{field_path(location)}'"
    return f"{field_path(location)}:"


def json_type(value: Any) -> str:
    """The JSON type of a parsed value, as a message names it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "a string"


def _field_names(model: type[BaseModel]) -> str:
    names = [f"'{name}'" for name in model.model_fields]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


# The models of a transaction's operations, by the tag pydantic puts in an error's location.
_TXN_OPERATIONS: dict[Union[str, int], type[BaseModel]] = {
    "get": TxnGetOperation,
    "set": TxnSetOperation,
    "delete": TxnDeleteOperation,
}
_TXN_BRANCHES = ("success", "failure")


def _model_at(model: type[BaseModel], location: Sequence[Union[str, int]]) -> type[BaseModel]:
    """The model whose fields are at ``location`` (the item model inside a batch, a compare
    or an operation inside a transaction); ``location`` as pydantic gives it."""
    if not location:
        return model
    if location[0] == "items":
        return SetRequest
    if model is TxnRequest and location[0] == "compare":
        return TxnCompare
    if model is TxnRequest and location[0] in _TXN_BRANCHES and len(location) > 2:
        return _TXN_OPERATIONS.get(location[2], model)
    return model


def _without_tag(
    model: type[BaseModel], location: Sequence[Union[str, int]]
) -> tuple[Union[str, int], ...]:
    """``location`` without the operation's tag pydantic adds inside a transaction's branch
    (success.0.set.val → success.0.val), so that the message names the field as sent."""
    if (
        model is TxnRequest
        and len(location) > 2
        and location[0] in _TXN_BRANCHES
        and location[2] in _TXN_OPERATIONS
    ):
        return (*location[:2], *location[3:])
    return tuple(location)


# Which problem is reported when a body has several: the shape first, then names, then values.
_RANK = {"invalid_body": 0, "unknown_field": 1, "missing_field": 2}


def api_error(model: type[BaseModel], error: ValidationError) -> ApiError:
    """The one problem a client is told about, with the API's error code and a sentence."""
    problems = [_describe(model, problem) for problem in error.errors()]
    return min(problems, key=lambda problem: _RANK.get(problem.code, 3))


def _describe(model: type[BaseModel], problem: ErrorDetails) -> ApiError:
    kind, value = problem["type"], problem.get("input")
    location = _without_tag(model, problem["loc"])
    subject = _subject(location)
    name = location[-1] if location else ""
    if kind in ("model_type", "model_attributes_type", "dict_type") and not location:
        return ApiError(
            422,
            "invalid_body",
            f"The request body must be a JSON object with the fields {_field_names(model)}, "
            f"not {json_type(value)}.",
        )
    if kind == "extra_forbidden":
        owner = _model_at(model, problem["loc"][:-1])
        hint = " Did you mean 'val'?" if str(name).lower() in _VAL_MISSPELLINGS else ""
        if len(location) == 1:
            sentence = f"Unknown field '{name}': the body takes only {_field_names(owner)}."
        else:
            sentence = (
                f"{field_path(location)}: unknown field; an item takes only {_field_names(owner)}."
            )
        return ApiError(422, "unknown_field", sentence + hint)
    if kind == "missing":
        return ApiError(422, "missing_field", f"{subject} is required.")
    if kind == "union_tag_not_found":  # an operation of a transaction without its op
        return ApiError(422, "missing_field", f"{_subject((*location, 'op'))} is required.")
    if kind == "union_tag_invalid":
        tag = (problem.get("ctx") or {}).get("tag")
        return ApiError(
            422,
            "invalid_type",
            f"{_subject((*location, 'op'))} must be 'get', 'set' or 'delete', not '{tag}'.",
        )
    if kind == "string_unicode":  # a lone surrogate, found by pydantic inside an operation
        return ApiError(
            422,
            "invalid_string",
            f"{subject} contains an unpaired UTF-16 surrogate, which is not text.",
        )
    if kind == "literal_error":
        expected_values = (problem.get("ctx") or {}).get("expected")
        return ApiError(
            422, "invalid_type", f"{subject} must be {expected_values}, not {_shown(value)}."
        )
    if kind == "greater_than_equal" and name == "version":
        return ApiError(
            422, "invalid_type", f"{subject} must be an integer from 0, not {_shown(value)}."
        )
    if name == "ttl" and kind != "missing":
        return ApiError(
            422,
            "invalid_ttl",
            f"{subject} must be a number of seconds above 0 and at most {MAX_TTL_SECONDS} "
            f"(ten years), not {_shown(value)}.",
        )
    if name == "lease" and kind == "string_too_long":
        return ApiError(
            422,
            "invalid_type",
            f"{subject} must be a lease's id, at most {LEASE_ID_MAX_CHARS} characters.",
        )
    token_error = _token_error(model, kind, location, value)
    if token_error is not None:
        return token_error
    if kind == "string_too_short":
        return ApiError(422, "empty_key", f"{subject} must not be empty.")
    if kind in ("too_short", "too_long"):
        limit = MAX_MGET_KEYS if model is MgetRequest else MAX_BATCH_WRITES
        return ApiError(
            422,
            "invalid_batch",
            f"{subject} must hold 1 to {limit} entries, not {len(value or ())}.",
        )
    expected = {
        "string_type": "a string",
        "int_type": "an integer",
        "bool_type": "true or false",
        "list_type": "an array",
        "model_type": "an object",
        "model_attributes_type": "an object",
        "dict_type": "an object",
    }.get(kind, "valid")
    return ApiError(422, "invalid_type", f"{subject} must be {expected}, not {json_type(value)}.")


# The seconds fields of the token endpoints, and the bounds a 422 names.
_TOKEN_SECONDS = {
    "expires_in": f"above 0 and at most {MAX_TTL_SECONDS} (ten years)",
    "grace": f"from 0 to {MAX_GRACE_SECONDS} (a day)",
}


def _token_error(
    model: type[BaseModel], kind: str, location: Sequence[Union[str, int]], value: Any
) -> Optional[ApiError]:
    """The token endpoints' own complaints: a name, the number of rules, a number of seconds;
    None for what the general rules say well enough."""
    subject = _subject(location)
    name = location[-1] if location else ""
    if name == "name" and kind in ("string_pattern_mismatch", "string_too_long"):
        return ApiError(
            422,
            "invalid_name",
            f"{subject} must be 1 to 64 of the characters A-Z, a-z, 0-9, '.', '_' and '-'.",
        )
    if model is TokenRequest and tuple(location) == ("rules",) and kind == "too_long":
        return ApiError(
            422,
            "invalid_rules",
            f"{subject} may hold at most {MAX_TOKEN_RULES} rules, not {len(value or ())}.",
        )
    bounds = _TOKEN_SECONDS.get(str(name))
    if bounds is not None and len(location) == 1 and kind not in ("missing", "extra_forbidden"):
        return ApiError(
            422,
            "invalid_seconds",
            f"{subject} must be a number of seconds {bounds}, not {_shown(value)}.",
        )
    return None


def _shown(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return json_type(value)


QueryModel = TypeVar("QueryModel", ListQuery, ChangesQuery, ExportQuery, ImportQuery)
# What each query parameter must be, as the 422 says it.
_PARAMETER_RULES = {
    ListQuery: {
        "limit": f"must be an integer from 1 to {MAX_PAGE}",
        "values": "must be true or false",
    },
    ChangesQuery: {
        "since": "must be a revision: an integer from 0",
        "limit": f"must be an integer from 1 to {MAX_EVENTS}",
        "timeout": f"must be a number of seconds from 0 to {MAX_WAIT_SECONDS}",
    },
    ExportQuery: {},
    ImportQuery: {"mode": "must be merge or replace"},
}


def parse_query(model: type[QueryModel], query: Any) -> QueryModel:
    """The parameters from the query string; 422 invalid_parameter naming one."""
    for name in query:
        if len(query.getall(name)) > 1:
            raise ApiError(422, "invalid_parameter", f"Query parameter '{name}' is given twice.")
    try:
        return model.model_validate(dict(query))
    except ValidationError as error:
        problem = error.errors()[0]
        name = str(problem["loc"][0]) if problem["loc"] else "?"
        sentence = _PARAMETER_RULES[model].get(
            name, f"is not one this endpoint takes: {', '.join(model.model_fields)}"
        )
        raise ApiError(422, "invalid_parameter", f"Query parameter '{name}' {sentence}.") from None

"""The request models: the one declaration of what each request may carry.

pydantic validates every request body and the listing's query parameters with these models,
and (see the API document) describes them. Validation errors become the API's own error
codes in ``api_error``; the limits that depend on settings (key and value bytes) are checked
by the handlers, since a model is declared once for every server.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, Literal, Optional, TypeVar, Union

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError
from pydantic_core import ErrorDetails

from .errors import ApiError
from .store.base import MAX_TTL_SECONDS

MAX_MGET_KEYS = 1_000
MAX_BATCH_WRITES = 10_000
MAX_PAGE = 1_000
DEFAULT_PAGE = 100
MAX_EVENTS = 1_000
MAX_WAIT_SECONDS = 60

# No NUL (U+0000) in keys or values: said in the document (a JSON Schema pattern), checked by
# the handlers (handlers.check_text, as the byte limits, with the API's own error code).
_NO_NUL = {"pattern": "^[^\\u0000]*$"}
Key = Annotated[
    StrictStr,
    Field(
        min_length=1,
        description="Any non-empty string without NUL; at most KV_MAX_KEY_BYTES of UTF-8.",
        json_schema_extra=_NO_NUL,
    ),
]
Val = Annotated[
    StrictStr,
    Field(
        description="Any string without NUL; at most KV_MAX_VALUE_BYTES of UTF-8.",
        json_schema_extra=_NO_NUL,
    ),
]
Ttl = Annotated[
    float,
    Field(
        gt=0,
        le=MAX_TTL_SECONDS,
        allow_inf_nan=False,
        description="Seconds until the key expires (above 0, at most ten years). Without it, "
        "the key never expires, and an earlier expiry is removed.",
    ),
]


class RequestModel(BaseModel):
    """Strict JSON: no field beyond those declared, no coercion ("5" is not a number)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class SetRequest(RequestModel):
    """POST /set, and each item of POST /mset."""

    key: Key
    val: Val
    ttl: Optional[Ttl] = None


class MgetRequest(RequestModel):
    """POST /mget."""

    keys: Annotated[list[Key], Field(min_length=1, max_length=MAX_MGET_KEYS)]


class MsetRequest(RequestModel):
    """POST /mset: all items are written in one transaction, or none."""

    items: Annotated[list[SetRequest], Field(min_length=1, max_length=MAX_BATCH_WRITES)]


class MdeleteRequest(RequestModel):
    """POST /mdelete: all keys are deleted in one transaction."""

    keys: Annotated[list[Key], Field(min_length=1, max_length=MAX_BATCH_WRITES)]


class ListQuery(BaseModel):
    """GET /keys: query parameters, which arrive as text (so not strict)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefix: str = Field(default="", description="Only keys that start with this.")
    limit: int = Field(
        default=DEFAULT_PAGE, ge=1, le=MAX_PAGE, description="The most keys on one page."
    )
    cursor: Optional[str] = Field(
        default=None,
        pattern="^[A-Za-z0-9_-]+$",
        description="The previous page's cursor, as given; absent for the first page.",
    )
    values: bool = Field(default=False, description="Whether each item carries its value.")


class ChangesQuery(BaseModel):
    """GET /changes: query parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefix: str = Field(default="", description="Only changes to keys that start with this.")
    since: Optional[int] = Field(
        default=None,
        ge=0,
        le=2**62,
        description="Answer the changes in revisions above this one (a previous answer's "
        "next, a listing's KV-Revision). Absent: from the store's revision now on. "
        "Last-Event-ID, when sent, wins.",
    )
    limit: int = Field(
        default=MAX_EVENTS,
        ge=1,
        le=MAX_EVENTS,
        description="The most events in one answer, but a revision is never split: an answer "
        "may pass it to finish one.",
    )
    timeout: float = Field(
        default=30,
        ge=0,
        le=MAX_WAIT_SECONDS,
        allow_inf_nan=False,
        description="Seconds a long-poll waits when there is no change yet; 0 answers at once.",
    )


class ExportQuery(BaseModel):
    """GET /export: query parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefix: str = Field(default="", description="Only keys that start with this.")


class ImportQuery(BaseModel):
    """POST /import: query parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["merge", "replace"] = Field(
        default="merge",
        description="merge: set every line's key, leaving the others. replace: afterwards the "
        "store holds exactly the file's keys under prefix (in the whole store without one).",
    )
    prefix: str = Field(
        default="",
        description="Every line's key must start with this; with replace, the keys under it "
        "that the file lacks are removed.",
    )


# --- answers -------------------------------------------------------------------------------

# When a key expires, as the KV-Expires-At header, listings and the change feed give it.
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def rfc3339(milliseconds: int) -> str:
    """An expiry as RFC 3339 UTC with milliseconds: 2026-11-27T07:00:00.000Z."""
    moment = _EPOCH + timedelta(milliseconds=milliseconds)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{milliseconds % 1000:03d}Z"


# What the endpoints answer, for the API document: handlers write these shapes with orjson
# directly (a model per response would cost more than the rest of a GET), and schemathesis
# checks in CI that every answer conforms to them.


class KeyValue(BaseModel):
    """A key and its value: the answer of GET /get/{key} and POST /set."""

    key: str
    val: str


class Deleted(BaseModel):
    """The answer of DELETE /delete/{key}."""

    key: str
    deleted: Literal[True]


class ListedItem(BaseModel):
    """One key of a listing; ``val`` only with values=true."""

    key: str
    version: int = Field(description="The revision of the write that last changed the key.")
    expires_at: Optional[str] = Field(
        description="When the key expires (RFC 3339, UTC, milliseconds), or null."
    )
    val: Optional[str] = Field(default=None, description="Present with values=true.")


class ListPage(BaseModel):
    """A page of GET /keys."""

    items: list[ListedItem]
    cursor: Optional[str] = Field(
        description="Pass it as ?cursor= for the next page; null on the last."
    )


class MgetItem(BaseModel):
    key: str
    val: Optional[str] = Field(description="null when the key has no value (absent or expired).")


class MgetAnswer(BaseModel):
    """The answer of POST /mget, in request order."""

    items: list[MgetItem]


class MsetAnswer(BaseModel):
    """The answer of POST /mset."""

    count: int = Field(description="How many items were written.")
    version: int = Field(description="The revision all the items now have.")


class MdeleteAnswer(BaseModel):
    """The answer of POST /mdelete."""

    deleted: int = Field(description="How many of the keys had a value.")


class Health(BaseModel):
    """The answer of GET /health."""

    status: Literal["ok"]
    store: Literal["sqlite", "memory", "postgres"]


class ConfigView(BaseModel):
    """The answer of GET /config: the effective settings (secrets as "**********")."""

    model_config = ConfigDict(extra="allow")

    input_db_used: Optional[str] = Field(description="The input.db seeding read, or null.")


class ChangeEvent(BaseModel):
    """One key's change in one revision; ``val`` and ``expires_at`` only on a set."""

    revision: int = Field(description="The revision of the write; a batch's keys share it.")
    type: Literal["set", "delete", "expire"] = Field(
        description="set, delete, or expire: the key's time ran out and the purge removed it."
    )
    key: str
    val: Optional[str] = Field(default=None, description="The value set (a set only).")
    expires_at: Optional[str] = Field(
        default=None,
        description="When the key set expires (RFC 3339, UTC, milliseconds), or null (a set only).",
    )


class ChangesAnswer(BaseModel):
    """A long-poll answer of GET /changes."""

    events: list[ChangeEvent] = Field(description="In revision order; a revision's keys in order.")
    next: int = Field(
        description="The since of the next request: the store's revision when the answer was "
        "made, or with more, the last event's revision."
    )
    more: bool = Field(description="Whether the limit cut the answer short.")


class BulkLine(BaseModel):
    """One line of an export, and of an import's body: NDJSON, one object a line."""

    model_config = ConfigDict(extra="forbid")

    key: Key
    val: Val
    expires_at: Optional[str] = Field(
        default=None,
        description="When the key expires (RFC 3339; an export gives UTC with milliseconds), "
        "or null. An import skips (and counts) a line whose time has passed; at most ten "
        "years ahead.",
    )


class ImportAnswer(BaseModel):
    """The answer of POST /import."""

    imported: int = Field(description="Lines applied (a key's earlier lines included).")
    skipped: int = Field(description="Lines skipped because their expires_at had passed.")
    revision: int = Field(
        description="The import's revision, which every key it wrote has as its version; the "
        "store's unchanged revision when it changed nothing."
    )


class ErrorBody(BaseModel):
    """Every non-2xx answer."""

    error: str = Field(description="A code, one of those listed with the status.")
    message: str = Field(description="What went wrong, in a sentence.")


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


def is_text(text: str) -> bool:
    """Whether ``text`` is text: no unpaired UTF-16 surrogate (JSON can escape one)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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


def _model_at(model: type[BaseModel], location: Sequence[Union[str, int]]) -> type[BaseModel]:
    """The model whose fields are at ``location`` (the item model inside a batch)."""
    return SetRequest if location and location[0] == "items" else model


# Which problem is reported when a body has several: the shape first, then names, then values.
_RANK = {"invalid_body": 0, "unknown_field": 1, "missing_field": 2}


def api_error(model: type[BaseModel], error: ValidationError) -> ApiError:
    """The one problem a client is told about, with the API's error code and a sentence."""
    problems = [_describe(model, problem) for problem in error.errors()]
    return min(problems, key=lambda problem: _RANK.get(problem.code, 3))


def _describe(model: type[BaseModel], problem: ErrorDetails) -> ApiError:
    kind, location, value = problem["type"], problem["loc"], problem.get("input")
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
        owner = _model_at(model, location[:-1])
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
    if name == "ttl" and kind != "missing":
        return ApiError(
            422,
            "invalid_ttl",
            f"{subject} must be a number of seconds above 0 and at most {MAX_TTL_SECONDS} "
            f"(ten years), not {_shown(value)}.",
        )
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
        "list_type": "an array",
        "model_type": "an object",
        "model_attributes_type": "an object",
        "dict_type": "an object",
    }.get(kind, "valid")
    return ApiError(422, "invalid_type", f"{subject} must be {expected}, not {json_type(value)}.")


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

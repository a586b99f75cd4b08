"""schemathesis' hooks for tests/kv/slow/test_schemathesis.py (loaded by SCHEMATHESIS_HOOKS).

POST /import's body is NDJSON, which the document can only describe as a string (its lines,
each a BulkLine, are said in words): it is sent as that string's bytes, lone surrogates
included (not UTF-8, which the server must refuse with a 422), and anything else the
negative phase draws as its JSON.
"""

from __future__ import annotations

import json
from typing import Any

import schemathesis


@schemathesis.serializer("application/x-ndjson")
def ndjson(context: Any, value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    return json.dumps(value).encode("utf-8")

"""The floor: the fastest honest aiohttp key-value server, for bench/run.py to compare against.

aiohttp on uvloop, a dict, GET /get/{key} and POST /set, and nothing else: no validation, no
logging, no durability, no request ids. Whatever the real service costs on top of this is
what its guarantees cost.

    python bench/floor_app.py --port 8001 --input-db input.db
"""

from __future__ import annotations

import uvloop
from aiohttp import web
from reference import load_input_db, parse_reference_args

data: dict[str, str] = {}


async def get_value(request: web.Request) -> web.Response:
    key = request.match_info["key"]
    val = data.get(key)
    if val is None:
        raise web.HTTPNotFound()
    return web.json_response({"key": key, "val": val})


async def set_value(request: web.Request) -> web.Response:
    body = await request.json()
    data[body["key"]] = body["val"]
    return web.json_response(body)


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def main() -> None:
    args = parse_reference_args(__doc__.split("\n\n")[0], default_port=8001)
    if args.input_db:
        load_input_db(args.input_db, data)
    app = web.Application()
    app.router.add_get("/get/{key}", get_value)
    app.router.add_post("/set", set_value)
    app.router.add_get("/health", health)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()

"""The alternative a user would pick: FastAPI on uvicorn (uvloop and httptools), the stack the
original brief hinted at, with the same two endpoints over a dict and pydantic validation.

    python bench/fastapi_app.py --port 8002 --input-db input.db
"""

from __future__ import annotations

import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
from reference import load_input_db, parse_reference_args

app = FastAPI()
data: dict[str, str] = {}


class Item(BaseModel):
    key: str
    val: str


@app.get("/get/{key:path}")
async def get_value(key: str) -> Item:
    val = data.get(key)
    if val is None:
        raise HTTPException(status_code=404, detail="not found")
    return Item(key=key, val=val)


@app.post("/set")
async def set_value(item: Item) -> Item:
    data[item.key] = item.val
    return item


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


def main() -> None:
    args = parse_reference_args(__doc__.split("\n\n")[0], default_port=8002)
    if args.input_db:
        load_input_db(args.input_db, data)
    uvicorn.run(
        app, host="127.0.0.1", port=args.port, access_log=False, log_level="warning",
        loop="uvloop", http="httptools",
    )  # fmt: skip


if __name__ == "__main__":
    main()

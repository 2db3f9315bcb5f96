"""The HTTP ceiling for bench_hub: the hub's upload route with nothing behind it.

    python benchmarks/null_hub.py PORT

Same server as ``edgepeft hub serve`` (uvicorn, one worker, the same FastAPI stack and the same body reader), but
the upload handler only reads the body and answers 201: no token check, no validation, no store. The rate the
benchmark's clients reach against it is what this machine's HTTP stack allows, so the hub's own rate is read as a
fraction of it.
"""

from __future__ import annotations

import sys

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from edgepeft.hub.bodies import read_body

app = FastAPI()


@app.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/api/v1/devices/{device_id}/deltas", status_code=201)
async def upload(device_id: str, request: Request) -> JSONResponse:
    data = await read_body(request, 16 * 2**20)
    return JSONResponse({"id": device_id, "size": len(data)}, status_code=201)


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")

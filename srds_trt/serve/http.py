"""HTTP plumbing the REST and OpenAI routes share: a size-bounded body read and disconnect-driven cancellation."""

from __future__ import annotations

import asyncio
import contextlib

from starlette.requests import ClientDisconnect, Request

from .service import RequestError


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 before reading when Content-Length says it is over `limit`, and while
    streaming when a chunked body grows past it."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise RequestError(400, f"Content-Length must be an integer, got {declared[:40]!r}") from None
        if size > limit:
            raise RequestError(413, f"the request body is {size} bytes; this server takes at most {limit} "
                                    "(--max-body-mb)")
    chunks, total = [], 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise RequestError(413, f"the request body exceeds {limit} bytes (--max-body-mb)")
            chunks.append(chunk)
    except ClientDisconnect:
        raise RequestError(499, "the client went away while sending the body") from None
    return b"".join(chunks)


async def until_disconnected(request: Request, work):
    """Await `work`; when the client disconnects first, cancel it (the batcher then abandons the request)."""
    task = asyncio.ensure_future(work)

    async def watch():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise RequestError(499, "the client went away; its request was abandoned")
    return task.result()

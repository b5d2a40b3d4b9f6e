"""An OpenAI-style `/v1/completions` endpoint over the token tuner, streaming released tokens.

POST /v1/completions  {"prompt": str, "max_tokens": int (default 32), "stream": bool,
                       "temperature": float (default 0: greedy), "seed": int (sampling; default 0)}
    stream=false: one JSON answer; stream=true: server-sent events, one per token as soon as it is
    released (at a ramp or the final layer), then `data: [DONE]`. Every completion also reports
    where each token left (`apparate.exit_layers`, null for the final layer).
GET  /v1/models, GET /v1/apparate/state (the controller's mode, config and window stats).
Bad input (not JSON, empty prompt, max_tokens outside 1..limit, prompt longer than the limit)
is a 400 with {"error": ...}.

Concurrent requests are decoded together: one scheduler thread (`scheduler.Scheduler`) runs up
to `max_batch` sequences per decode step, a waiting request joining as soon as a slot frees, and
each sequence's tokens stream to its own client. Each finished sequence feeds the controller
(tokens are its inputs). `app.state.scheduler` is the thread (its stats are in the state).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Any

from .control import TokenTuner
from .decode import Sampling, Token
from .scheduler import Request as Job, Scheduler  # (starlette has its own Request)


def create_app(tuner: TokenTuner, max_tokens_limit: int = 256, max_prompt_tokens: int = 1024,
               name: str = "smollm2-135m-instruct", max_batch: int = 8) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    scheduler = Scheduler(tuner, max_batch)
    tok = tuner.lm.tokenizer

    def bad(msg: str) -> JSONResponse:
        return JSONResponse({"error": msg}, status_code=400)

    def layer_of(t: Token, sites: tuple[int, ...]) -> int | None:
        return tuner.ramps.layers[sites[t.exit]] + 1 if t.exit < len(sites) else None

    async def completions(request: Request) -> Any:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return bad("the body is not JSON")
        if not isinstance(body, dict):
            return bad("the body must be a JSON object")
        prompt, max_tokens, stream = body.get("prompt"), body.get("max_tokens", 32), body.get("stream", False)
        if not isinstance(prompt, str) or not prompt.strip():
            return bad("prompt must be a non-empty string")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= max_tokens_limit:
            return bad(f"max_tokens must be an integer from 1 to {max_tokens_limit}")
        if not isinstance(stream, bool):
            return bad("stream must be true or false")
        temperature, seed = body.get("temperature", 0), body.get("seed", 0)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 10:
            return bad("temperature must be a number from 0 (greedy) to 10")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            return bad("seed must be a non-negative integer")
        sampling = Sampling(float(temperature), seed) if temperature > 0 else None
        ids = tuner.lm.chat_ids(prompt)
        if len(ids) > max_prompt_tokens:
            return bad(f"the prompt is {len(ids)} tokens; at most {max_prompt_tokens}")
        cid = "cmpl-" + uuid.uuid4().hex[:16]
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        emitted: list[int] = []
        text_so_far = [""]

        def on_emit(t: Token) -> None:  # decode thread: the piece of text this token adds
            emitted.append(t.token)
            text = tok.decode(emitted, skip_special_tokens=True)
            piece, text_so_far[0] = text[len(text_so_far[0]):], text
            put("token", piece, t)

        def put(*item: Any) -> None:  # decode thread -> this request's event loop
            with contextlib.suppress(RuntimeError):  # the loop is closed: the client is gone
                loop.call_soon_threadsafe(queue.put_nowait, item)

        scheduler.submit(Job(ids, max_tokens, sampling, on_emit,
                             on_done=lambda dec, cfg: put("done", dec, cfg),
                             on_error=lambda msg: put("error", msg, None)))

        def summary(dec: Any, cfg: Any) -> dict[str, Any]:
            finish = "stop" if dec.tokens[-1].token in tuner.lm.eos_ids else "length"
            exits = [layer_of(t, cfg.sites) for t in dec.tokens]
            return {"finish_reason": finish,
                    "usage": {"prompt_tokens": len(ids), "completion_tokens": len(dec.tokens),
                              "total_tokens": len(ids) + len(dec.tokens)},
                    "apparate": {"exit_layers": exits, "released_at_ramp": sum(e is not None for e in exits),
                                 "agree_with_deep": sum(t.token == t.deep for t in dec.tokens),
                                 "mode": tuner.mode()}}

        if not stream:
            while True:
                kind, a, b = await queue.get()
                if kind == "error":
                    return JSONResponse({"error": a}, status_code=500)
                if kind == "done":
                    s = summary(a, b)
                    return JSONResponse({"id": cid, "object": "text_completion", "created": int(time.time()),
                                         "model": name, "choices": [{"index": 0, "text": text_so_far[0],
                                                                     "finish_reason": s["finish_reason"]}],
                                         "usage": s["usage"], "apparate": s["apparate"]})

        async def events():
            while True:
                kind, a, b = await queue.get()
                if kind == "token":
                    chunk = {"id": cid, "object": "text_completion", "model": name,
                             "choices": [{"index": 0, "text": a, "finish_reason": None}],
                             "apparate": {"exit": "ramp" if b.exit < len(b.conf) else "final"}}
                    yield f"data: {json.dumps(chunk)}\n\n"
                elif kind == "error":
                    yield f"data: {json.dumps({'error': a})}\n\n"
                    break
                else:
                    s = summary(a, b)
                    chunk = {"id": cid, "object": "text_completion", "model": name,
                             "choices": [{"index": 0, "text": "", "finish_reason": s["finish_reason"]}],
                             "usage": s["usage"], "apparate": s["apparate"]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                    break
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def models(request: Request) -> Any:
        return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "owned_by": "apparate"}]})

    async def state(request: Request) -> Any:
        body = {"mode": tuner.mode(), "config": tuner.config.to_dict(), "layers": list(tuner.ramps.layers),
                "stats": tuner.controller.stats(), "batching": scheduler.stats()}
        # the controller's stats hold numpy scalars
        return JSONResponse(json.loads(json.dumps(body, default=lambda o: o.item() if hasattr(o, "item") else str(o))))

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                            Route("/v1/models", models), Route("/v1/apparate/state", state)], lifespan=lifespan)
    app.state.scheduler = scheduler
    return app

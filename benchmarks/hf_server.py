"""The "standard implementation" baseline: a plain transformers server.

FastAPI + `model.generate`, one request at a time (requests queue on a lock), streaming
each new token as an OpenAI completions chunk. Same weights as kubellm (the built-in
SmolLM2 GGUF, dequantized by transformers), fp32 on CPU.

    python benchmarks/hf_server.py --port 8001
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import threading
import time
import uuid

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer

from kubellm.runtime.model.source import builtin_gguf_path

_DONE = object()


class TokenQueue(BaseStreamer):
    """Each generated token id, as generate produces it (the prompt's first put skipped)."""

    def __init__(self) -> None:
        self.tokens: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.tokens.put(token)

    def end(self) -> None:
        self.tokens.put(_DONE)


def build_app(model, tokenizer, name: str) -> FastAPI:
    app = FastAPI()
    one_at_a_time = asyncio.Lock()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(body: dict):
        ids = tokenizer(body["prompt"], return_tensors="pt").input_ids
        max_tokens = int(body.get("max_tokens") or 16)
        kwargs = {"max_new_tokens": max_tokens, "do_sample": False}
        if body.get("ignore_eos"):
            kwargs["min_new_tokens"] = max_tokens
        events = _generate(model, tokenizer, ids, kwargs, one_at_a_time, name)
        if body.get("stream"):
            return StreamingResponse(events, media_type="text/event-stream")
        text = ""
        async for event in events:
            if event.startswith("data: {"):
                choices = json.loads(event[6:])["choices"]
                text += choices[0]["text"] if choices else ""
        return JSONResponse({"choices": [{"index": 0, "text": text}]})

    return app


async def _generate(model, tokenizer, ids, kwargs, lock: asyncio.Lock, name: str):
    request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(text: str, finish: str | None, usage: dict | None = None) -> str:
        choices = [] if usage else [{"index": 0, "text": text, "finish_reason": finish}]
        body = {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": name,
            "choices": choices,
        }
        if usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    async with lock:
        streamer = TokenQueue()
        worker = threading.Thread(
            target=lambda: model.generate(ids, streamer=streamer, **kwargs), daemon=True
        )
        worker.start()
        count = 0
        while (token := await asyncio.to_thread(streamer.tokens.get)) is not _DONE:
            count += 1
            yield chunk(tokenizer.decode([token]), None)
        worker.join()
    yield chunk("", "length" if count >= kwargs["max_new_tokens"] else "stop")
    usage = {
        "prompt_tokens": ids.shape[1],
        "completion_tokens": count,
        "total_tokens": ids.shape[1] + count,
    }
    yield chunk("", None, usage)
    yield "data: [DONE]\n\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--served-model-name", default="smollm2-135m-instruct")
    args = p.parse_args()
    path = builtin_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    app = build_app(model, tokenizer, args.served_model_name)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()

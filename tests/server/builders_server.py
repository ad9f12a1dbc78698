"""Helpers for the server tests: a tiny GGUF from our converter, real uvicorn servers on random ports,
and a way to hold the engine busy deterministically."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

import httpx

from tests import builders


def sp_size(model: Path) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(model)).get_piece_size()


def tiny_gguf(root: Path, tokenizer_model: Path, *, seed: int = 0, outtype: str = "f32",
              chat_template: str = "alpaca", max_position_embeddings: int = 512) -> Path:
    """A random 2-layer LLaMA (hidden 64) on ``tokenizer_model``, converted by our converter."""
    from cllama_deploy.gguf.convert import ConvertConfig, convert

    model_dir = builders.make_tiny_llama(root / f"hf-{seed}", sp_size(tokenizer_model),
                                         tokenizer_model=tokenizer_model, seed=seed,
                                         max_position_embeddings=max_position_embeddings)
    out = root / f"tiny-{seed}-{outtype}.gguf"
    convert(ConvertConfig(model_dir=model_dir, out=out, outtype=outtype, chat_template=chat_template,
                          show_progress=False))
    return out


class ServerThread:
    """Real uvicorn on 127.0.0.1 and a random port, in a background thread."""

    def __init__(self, app, graceful_timeout: float = 5.0):
        import uvicorn

        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                                timeout_graceful_shutdown=int(graceful_timeout), log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True, name=f"uvicorn-{self.port}")

    def start(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def make_server(settings, engine=None, loaders=None) -> ServerThread:
    from cllama_deploy.server.app import create_app

    return ServerThread(create_app(settings, engine, loaders=loaders)).start()


def load_engine(gguf: Path, **kw):
    from cllama_deploy.engine.llamacpp import LlamaCppConfig, LlamaCppEngine

    kw.setdefault("n_threads", 1)
    return LlamaCppEngine.load(LlamaCppConfig(model_path=str(gguf), **kw))


@contextlib.contextmanager
def engine_held(engine) -> Iterator[None]:
    """Make the engine admit nothing, every slot counting as busy, so requests queue up behind it."""
    with engine.scheduler.paused():
        yield


def wait_until(pred, timeout: float = 30.0, interval: float = 0.02) -> bool:
    """Poll ``pred`` until true (bounded); returns whether it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def sse_events(lines: Iterator[str]) -> list:
    """Parse server-sent events: JSON objects, and the final "[DONE]" string."""
    out = []
    for line in lines:
        if not line.startswith("data: "):
            assert line == "", f"unexpected SSE line {line!r}"
            continue
        data = line[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def stream_post(url: str, body: dict, headers: Optional[dict] = None, timeout: float = 60) -> tuple[int, list]:
    with httpx.Client(timeout=timeout) as c:
        with c.stream("POST", url, json=body, headers=headers or {}) as r:
            if r.status_code != 200:
                r.read()
                return r.status_code, [r.json()]
            assert r.headers["content-type"].startswith("text/event-stream")
            return 200, sse_events(r.iter_lines())

"""Session fixtures for the server tests: one tiny GGUF written by our converter, and real uvicorn
servers on 127.0.0.1 (random ports) with n_threads=1 (the client shares the 2 CPUs)."""

from __future__ import annotations

import pytest

from tests.server import builders_server as bs


@pytest.fixture(scope="session")
def server_sp_model(tmp_path_factory):
    """LLaMA-like BPE with byte fallback (as the shared ``base_sp_model``), 1000 pieces: the shared
    fixture's 512 is fewer than the characters its training text requires. Rare Chinese characters
    still come out as byte tokens (<0xE9><0xBE><0x98>...)."""
    from tests import builders

    return builders.train_llama_like_sp(tmp_path_factory.mktemp("server_sp") / "tokenizer.model",
                                        vocab_size=1000)


@pytest.fixture(scope="session")
def tiny_gguf_path(tmp_path_factory, server_sp_model):
    return bs.tiny_gguf(tmp_path_factory.mktemp("server_gguf"), server_sp_model)


@pytest.fixture(scope="session")
def engine(tiny_gguf_path):
    eng = bs.load_engine(tiny_gguf_path, model_id="tiny", n_ctx=512)
    yield eng
    eng.close(5)


@pytest.fixture(scope="session")
def server(engine):
    """The main server: no API key, one model 'tiny' (n_ctx 512)."""
    from cllama_deploy.server.settings import Settings

    srv = bs.make_server(Settings(max_queue=100, access_log=True, max_body_bytes=256 * 1024), engine)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def url(server):
    return server.url

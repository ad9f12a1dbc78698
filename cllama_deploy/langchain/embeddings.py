"""CLlamaEmbeddings: one vector per text from a GGUF file, in-process, batched by the engine."""

from __future__ import annotations

from langchain_core.embeddings import Embeddings
from pydantic import ConfigDict, Field

from cllama_deploy.engine import requests as rl
from cllama_deploy.langchain.engines import EngineOptions


class CLlamaEmbeddings(EngineOptions, Embeddings):
    """Embeddings on a GGUF file (loaded on first use; shared with chat/LLM components on the same
    file and options).

    Always ONE vector per input text: the engine's embedding context mean-pools the last hidden
    states over the input's tokens (whatever pooling the GGUF declares, LLaMA GGUFs declare none)
    and L2-normalizes. ``batch_size`` texts go in one request, decoded together.
    """

    batch_size: int = Field(32, ge=1, le=2048, description="Texts per embeddings request.")

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True,
                              protected_namespaces=())

    def _batches(self, texts: list[str]):
        for i in range(0, len(texts), self.batch_size):
            yield texts[i:i + self.batch_size]

    @staticmethod
    def _vectors(resp) -> list[list[float]]:
        return [list(map(float, d.embedding)) for d in sorted(resp.data, key=lambda d: d.index)]

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        engine = self.get_engine()
        out: list[list[float]] = []
        for batch in self._batches(list(texts)):
            out.extend(self._vectors(rl.embed(engine, batch)))
        return out

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        engine = await self.aget_engine()
        out: list[list[float]] = []
        for batch in self._batches(list(texts)):
            out.extend(self._vectors(await rl.aembed(engine, batch)))
        return out

    async def aembed_query(self, text: str) -> list[float]:
        return (await self.aembed_documents([text]))[0]


__all__ = ["CLlamaEmbeddings"]


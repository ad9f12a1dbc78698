"""Asking the held-out questions: of the HF model with adapters (transformers + peft, in process) and of the
GGUFs (through the running server, with the official ``openai`` client, many requests at once).

Answers are compared exactly with the expected reading after stripping surrounding whitespace (the
Alpaca prompt ends with a space, so a model's answer starts with one, as with the seed's models).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from cllama_deploy.quickstart.numerals import instruction, to_chinese


@dataclass
class Answers:
    """What one model answered to the held-out questions."""

    numbers: list[int]
    answers: list[str]
    completion_tokens: int
    seconds: float
    how: str

    @property
    def expected(self) -> list[str]:
        return [to_chinese(n) for n in self.numbers]

    @property
    def correct(self) -> int:
        return sum(a.strip() == e for a, e in zip(self.answers, self.expected))

    @property
    def accuracy(self) -> float:
        return self.correct / len(self.numbers) if self.numbers else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0

    def wrong(self, limit: int = 5) -> list[dict]:
        out = [{"n": n, "expected": e, "answer": a.strip()}
               for n, a, e in zip(self.numbers, self.answers, self.expected) if a.strip() != e]
        return out[:limit]


@dataclass
class HFModel:
    """The base with its adapters merged in memory, in eval mode, and its tokenizer (the last adapter's)."""

    model: object
    tokenizer: object
    name: str
    loras: list[Path] = field(default_factory=list)


def load_hf(base: Path, loras: Sequence[Path]) -> HFModel:
    from cllama_deploy.evaluation.models import default_tokenizer, load_hf_model
    from cllama_deploy.tokenizer.hf import load_tokenizer

    loras = [Path(p) for p in loras]
    model = load_hf_model(Path(base), loras)
    tok = load_tokenizer(default_tokenizer(Path(base), loras))
    return HFModel(model=model, tokenizer=tok, name="+".join([Path(base).name] + [p.name for p in loras]), loras=loras)


def hf_answers(hf: HFModel, numbers: Sequence[int], *, batch_size: int = 64, max_new_tokens: int = 16) -> Answers:
    """Greedy answers of the HF model, ``batch_size`` prompts per ``generate`` call (left-padded)."""
    import torch

    from cllama_deploy.prompts import build_prompt

    tok, model = hf.tokenizer, hf.model
    bos, eos = tok.bos_token_id, tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    prompts = [build_prompt(instruction(n), "", variant="alpaca") for n in numbers]
    encoded = [[bos] + ids for ids in tok(prompts, add_special_tokens=False)["input_ids"]]
    answers: list[str] = []
    tokens = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(encoded), batch_size):
            part = encoded[i:i + batch_size]
            width = max(map(len, part))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in part])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in part])
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=pad)
            for row in out[:, width:].tolist():
                row = row[:row.index(eos) + 1] if eos in row else row
                tokens += len(row)
                answers.append(tok.decode([t for t in row if t not in (eos, pad)], skip_special_tokens=True))
    return Answers(list(numbers), answers, tokens, time.perf_counter() - t0,
                   f"transformers generate, greedy, {batch_size} prompts per batch")


def server_answers(base_url: str, model_id: str, numbers: Sequence[int], *, concurrency: int = 8,
                   max_tokens: int = 16, api_key: str = "quickstart") -> Answers:
    """Greedy answers from the server's /v1/chat/completions, ``concurrency`` requests in flight at once."""
    import asyncio

    from openai import AsyncOpenAI

    async def ask_all() -> tuple[list[str], int, float]:
        client = AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
        gate = asyncio.Semaphore(concurrency)

        async def ask(n: int):
            async with gate:
                r = await client.chat.completions.create(
                    model=model_id, messages=[{"role": "user", "content": instruction(n)}],
                    temperature=0.0, max_tokens=max_tokens, seed=0)
                return r.choices[0].message.content or "", r.usage.completion_tokens if r.usage else 0

        t0 = time.perf_counter()
        try:
            results = await asyncio.gather(*(ask(n) for n in numbers))
        finally:
            await client.close()
        return [a for a, _ in results], sum(t for _, t in results), time.perf_counter() - t0

    answers, tokens, seconds = asyncio.run(ask_all())
    return Answers(list(numbers), answers, tokens, seconds,
                   f"server /v1/chat/completions via openai client, {concurrency} concurrent requests")

"""Fixtures of the tokenizer tests: merged tokenizers built from the session's tiny models."""

from __future__ import annotations

import random

import pytest

from cllama_deploy.quickstart.corpus import EMOJI, chinese_lines, english_lines


def mixed_lines(n: int, seed: int = 0) -> list[str]:
    """Chinese/English/digits/emoji/odd whitespace lines (the text the merged tokenizer must survive)."""
    rng = random.Random(seed)
    zh, en = chinese_lines(n, seed=seed + 11), english_lines(n, seed=seed + 12)
    spaces = [" ", "  ", "\t", "   ", "\u3000", " \t "]
    out = []
    for i in range(n):
        parts = [zh[i][: rng.randint(1, 30)], en[i][: rng.randint(1, 30)], str(rng.randint(0, 10**6)),
                 rng.choice(EMOJI), "中文English混合", "ＡＢＣ１２３", "Ω≈ç√∫"]
        rng.shuffle(parts)
        line = "".join(p + (rng.choice(spaces) if rng.random() < 0.4 else "") for p in parts[: rng.randint(1, 7)])
        if rng.random() < 0.2:
            line = rng.choice(spaces) + line
        if rng.random() < 0.2:
            line = line + rng.choice(spaces)
        out.append(line)
    return out


@pytest.fixture(scope="session")
def mixed():
    return mixed_lines(400)


@pytest.fixture(scope="session")
def merged_dir(tmp_path_factory, base_sp_model, zh_sp_model):
    from cllama_deploy.tokenizer.merge import TokenizerMergeConfig, merge_tokenizers

    out = tmp_path_factory.mktemp("merged") / "tok"
    merge_tokenizers(TokenizerMergeConfig(base=base_sp_model, add=zh_sp_model, out=out))
    return out


@pytest.fixture(scope="session")
def merged_pad_dir(tmp_path_factory, base_sp_model, zh_sp_model):
    from cllama_deploy.tokenizer.merge import TokenizerMergeConfig, merge_tokenizers

    out = tmp_path_factory.mktemp("merged_pad") / "tok"
    merge_tokenizers(TokenizerMergeConfig(base=base_sp_model, add=zh_sp_model, out=out, pad_token=True))
    return out

"""Session fixtures for the deploy tests: a tiny base LLaMA, a pre-training LoRA that grows the
vocabulary (modules_to_save) and an SFT LoRA on top, and the reference merged model from peft."""

from __future__ import annotations

import pytest

from tests import builders
from tests.gguf import builders_gguf as bg
from tests.pipeline import builders_pipeline as bp


@pytest.fixture(scope="session")
def deploy_inputs(tmp_path_factory):
    """(base_dir, [pt_lora, sft_lora], reference merged transformers model, merged tokenizer.model).
    Read-only for the tests: a test that deploys again copies what it changes."""
    root = tmp_path_factory.mktemp("deploy_inputs")
    base_tok = bg.base_tokenizer(root / "base_tok" / "tokenizer.model")
    zh = bg.zh_tokenizer(root / "zh_tok" / "zh.model")
    merged_tok = bg.merge_sp(base_tok, zh, root / "merged_tok" / "tokenizer.model")
    # hidden 256, intermediate 512: row lengths that k-quants (256-value blocks) apply to, so Q4_K_M is Q4_K
    base = bg.tame(builders.make_tiny_llama(root / "base", bg.sp_size(base_tok), hidden_size=256,
                                            intermediate_size=512, num_heads=4, num_kv_heads=2,
                                            tokenizer_model=base_tok, seed=11), 0.05)
    pt = bp.make_lora(base, root / "pt_lora", new_vocab=bg.sp_size(merged_tok), tokenizer_model=merged_tok, seed=1)
    merged_pt = pt.merge_and_unload()
    sft = bp.make_lora(None, root / "sft_lora", base_model=merged_pt, tokenizer_model=merged_tok, seed=2)
    reference = sft.merge_and_unload().eval()
    return base, [root / "pt_lora", root / "sft_lora"], reference, merged_tok

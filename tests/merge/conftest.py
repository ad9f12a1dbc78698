"""Session fixtures for merge tests: tiny bases and real PEFT adapters (built once, no network)."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest

from tests.builders import make_tiny_llama
from tests.merge.builders_lora import (
    ALL_LINEAR,
    extend_sp_model,
    make_adapter,
    make_tokenizer_dir,
    peft_reference,
    train_sp_model,
)


@pytest.fixture(scope="session")
def lora_sp_model(tmp_path_factory):
    """LLaMA-like BPE tokenizer.model with 512 pieces (the bases' vocabulary)."""
    return train_sp_model(tmp_path_factory.mktemp("lora_sp") / "tokenizer.model", 512)


@pytest.fixture(autouse=True)
def _quiet_peft_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="session")
def mha_case(tmp_path_factory, lora_sp_model):
    """Untied MHA base (vocab 512) and one LoRA on every linear projection, no vocabulary change."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("mha")
    base = make_tiny_llama(root / "base", 512, tokenizer_model=lora_sp_model, seed=11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = make_adapter(AutoModelForCausalLM.from_pretrained(str(base)), root / "lora", r=4, alpha=8, seed=12)
    return SimpleNamespace(root=root, base=base, lora=lora)


@pytest.fixture(scope="session")
def plus_case(tmp_path_factory, lora_sp_model):
    """The seed's "Plus" recipe on a GQA base (vocab 512): a pre-training LoRA that grows the vocabulary
    to 555 (modules_to_save embed_tokens/lm_head, extended tokenizer), then an SFT LoRA trained on the
    merged PT model with 556 tokens (555 pieces + an added [PAD]), rsLoRA and rank/alpha patterns."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("plus")
    base = make_tiny_llama(root / "base", 512, num_heads=4, num_kv_heads=2, tokenizer_model=lora_sp_model, seed=21)
    ext = extend_sp_model(lora_sp_model, root / "ext" / "tokenizer.model", 43)
    pt_tok = make_tokenizer_dir(root / "pt_tok", ext)
    sft_tok = make_tokenizer_dir(root / "sft_tok", ext, {"[PAD]": 555})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(str(base))
        model.resize_token_embeddings(555, mean_resizing=False)
        pt = make_adapter(model, root / "pt", target_modules=["q_proj", "v_proj", "down_proj"],
                          modules_to_save=["embed_tokens", "lm_head"], r=8, alpha=16, seed=22, tokenizer_dir=pt_tok)
        merged_pt = peft_reference(base, [pt])
        merged_pt.resize_token_embeddings(556, mean_resizing=False)
        sft = make_adapter(merged_pt, root / "sft", target_modules=ALL_LINEAR,
                           modules_to_save=["embed_tokens", "lm_head"], r=4, alpha=8, seed=23, tokenizer_dir=sft_tok,
                           use_rslora=True, rank_pattern={"o_proj": 2}, alpha_pattern={"down_proj": 32})
    return SimpleNamespace(root=root, base=base, pt=pt, sft=sft, ext=ext)


@pytest.fixture(scope="session")
def tied_case(tmp_path_factory, lora_sp_model):
    """A tied-embedding base (vocab 512) with: an adapter whose modules_to_save grow both embed_tokens
    and lm_head to 555 (PEFT then unties); an adapter with LoRA on lm_head and on the embeddings
    (merged into the one shared matrix, which stays tied)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tied")
    base = make_tiny_llama(root / "base", 512, num_heads=4, num_kv_heads=1, tie_word_embeddings=True,
                           tokenizer_model=lora_sp_model, seed=31)
    ext = extend_sp_model(lora_sp_model, root / "ext" / "tokenizer.model", 43)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(str(base))
        model.resize_token_embeddings(555, mean_resizing=False)
        grow = make_adapter(model, root / "grow", target_modules=["q_proj", "k_proj"],
                            modules_to_save=["embed_tokens", "lm_head"], seed=32,
                            tokenizer_dir=make_tokenizer_dir(root / "ext_tok", ext))
        heads = make_adapter(AutoModelForCausalLM.from_pretrained(str(base)), root / "heads",
                             target_modules=["lm_head", "embed_tokens", "v_proj"], seed=33)
    return SimpleNamespace(root=root, base=base, grow=grow, heads=heads)


@pytest.fixture(scope="session")
def trained_case(tmp_path_factory, base_sp_model, zh_sp_model):
    """The Plus recipe made by `cllama-deploy train` itself, tiny: a 512-row base, the merged tokenizer
    (+ the [PAD] variant), a PT adapter that grows the vocabulary, and on top of it two SFT adapters with
    train's default modules_to_save=embed_tokens,lm_head: one with the [PAD] tokenizer (one more row, the
    seed's Alpaca-Plus) and one with the PT tokenizer (same rows as PT)."""
    from cllama_deploy.tokenizer.merge import TokenizerMergeConfig
    from cllama_deploy.tokenizer.merge import merge_tokenizers
    from tests.merge.builders_lora import train_adapter
    from tests.training import builders_training as bt

    root = tmp_path_factory.mktemp("trained")
    tok, tok_pad = root / "tok", root / "tok_pad"
    merge_tokenizers(TokenizerMergeConfig(base=base_sp_model, add=zh_sp_model, out=tok))
    merge_tokenizers(TokenizerMergeConfig(base=base_sp_model, add=zh_sp_model, out=tok_pad, pad_token=True))
    base = make_tiny_llama(root / "base", 512, tokenizer_model=base_sp_model, max_position_embeddings=512, seed=41)
    pt_data = bt.write_pt_texts(root / "pt_data", n_files=2, lines=80)
    sft_data = bt.write_alpaca(root / "sft_data", n=48)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pt = train_adapter("pt", base, tok, pt_data, root / "pt")
        sft = train_adapter("sft", base, tok_pad, sft_data, root / "sft", lora=[pt])
        sft_same = train_adapter("sft", base, tok, sft_data, root / "sft_same", lora=[pt])
    return SimpleNamespace(root=root, base=base, pt=pt, sft=sft, sft_same=sft_same, tok=tok, tok_pad=tok_pad,
                           vocab=bt.piece_count(tok / "tokenizer.model"))

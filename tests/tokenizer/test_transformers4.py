"""Issue 13: the HF directories we write, loaded by transformers 4.x in its own venv (tests/tokenizer/venv4.py)
and by this venv's transformers 5: the tokenizer encodes held-out Chinese text exactly like SentencePiece the
documented way, the merged model gives the same logits on both within 1e-4, nothing needs trust_remote_code.

The 4.x venv is built once per machine (~45 s from the pip cache) and reused; the probe script
(tests/tokenizer/transformers_probe.py) runs under each interpreter and reports JSON.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from cllama_deploy.prompts import build_prompt
from cllama_deploy.tokenizer.hf import remote_code_references
from cllama_deploy.tokenizer.spm import processor
from tests.tokenizer.conftest import mixed_lines
from tests.tokenizer.venv4 import TRANSFORMERS4, run_probe, transformers4_python

CHAT = [{"role": "user", "content": "用一句话介绍长城"}]


@pytest.fixture(scope="module")
def tf4():
    return transformers4_python()


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """Chinese text none of the tokenizers was trained on (other seeds), plus mixed-script lines."""
    from cllama_deploy.quickstart.corpus import chinese_lines

    path = tmp_path_factory.mktemp("heldout") / "zh.txt"
    lines = chinese_lines(400, seed=4242) + mixed_lines(200, seed=77)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory, base_sp_model, zh_sp_model):
    """`tokenizer merge --pad-token` output for each --hf-target."""
    from cllama_deploy.tokenizer.merge import TokenizerMergeConfig, merge_tokenizers

    root = tmp_path_factory.mktemp("tf4_tok")
    return {target: merge_tokenizers(TokenizerMergeConfig(base=base_sp_model, add=zh_sp_model,
                                                          out=root / target, pad_token=True,
                                                          hf_target=target)).out_dir
            for target in ("transformers4", "transformers5")}


@pytest.fixture(scope="module")
def merged_models(tmp_path_factory, base_sp_model, zh_sp_model):
    """`merge` of a base (rope_theta 1e6, saved by transformers 5) and a PT LoRA that grows the vocabulary and
    carries only tokenizer.model (the case that gave no tokenizer config at all), for each --hf-target."""
    from cllama_deploy.merge import MergeConfig, merge
    from cllama_deploy.tokenizer.merge import TokenizerMergeConfig, merge_tokenizers
    from tests import builders
    from tests.gguf import builders_gguf as bg
    from tests.pipeline import builders_pipeline as bp

    root = tmp_path_factory.mktemp("tf4_model")
    tok = merge_tokenizers(TokenizerMergeConfig(base=base_sp_model, add=zh_sp_model, out=root / "tok")).model_path
    base = bg.tame(builders.make_tiny_llama(root / "base", bg.sp_size(base_sp_model), num_heads=4, num_kv_heads=2,
                                            rope_theta=1e6, tokenizer_model=base_sp_model, seed=5))
    (base / "generation_config.json").unlink()  # merge must write one
    bp.make_lora(base, root / "pt_lora", new_vocab=bg.sp_size(tok), tokenizer_model=tok, seed=3)
    assert sorted(p.name for p in (root / "pt_lora").glob("tokenizer*")) == ["tokenizer.model"]
    return {target: merge(MergeConfig(base=base, loras=[root / "pt_lora"], out=root / f"merged-{target}",
                                      hf_target=target, show_progress=False)).out
            for target in ("transformers4", "transformers5")}


def test_no_directory_needs_remote_code(tokenizer_dirs, merged_models):
    for d in [*tokenizer_dirs.values(), *merged_models.values()]:
        assert remote_code_references(d) == [], d
        assert not (d / "tokenizer.json").exists()


def test_merged_model_dir_is_complete(merged_models):
    """What a GPU serving stack takes as it is: config, weights, tokenizer config with the chat template,
    generation config."""
    for target, d in merged_models.items():
        names = {p.name for p in d.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
                "special_tokens_map.json", "generation_config.json"} <= names
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        assert cfg["tokenizer_class"] == {"transformers4": "LlamaTokenizer",
                                          "transformers5": "SentencePieceBackend"}[target]
        assert cfg["chat_template"] and cfg["legacy"] is True and cfg["add_bos_token"] is True
        config = json.loads((d / "config.json").read_text())
        assert config["rope_theta"] == 1e6 and config["torch_dtype"] == config["dtype"] == "float32"
        assert json.loads((d / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}


def test_transformers4_tokenizer_exact_the_documented_way(tf4, tokenizer_dirs, merged_models, heldout, tmp_path):
    dirs = [tokenizer_dirs["transformers4"], merged_models["transformers4"]]
    jobs = [{"dir": str(d), "modes": ["auto", "auto_slow", "llama"], "lines": str(heldout), "chat": CHAT}
            for d in dirs]
    jobs.append({"dir": str(tokenizer_dirs["transformers5"]), "modes": ["auto"], "lines": str(heldout)})
    result = run_probe(tf4, {"tokenizers": jobs}, tmp_path)
    assert result["transformers"] == TRANSFORMERS4
    lines = len(heldout.read_text(encoding="utf-8").splitlines())
    for d, res in zip(dirs, result["tokenizers"]):
        sp = processor(d / "tokenizer.model")
        for mode in ("auto_slow", "llama"):  # use_fast=False, and the seed's scripts' LlamaTokenizer
            r = res[mode]
            assert r["class"] == "LlamaTokenizer" and r["lines"] == lines, r
            assert r["mismatches"] == 0, r["example"]
            assert r["chat"] == "<s>" + build_prompt(CHAT[0]["content"])
            assert r["bos_token_id"] == sp.bos_id() and r["eos_token_id"] == sp.eos_id()
        # the default still loads (the fast tokenizer, not exact: see docs/tokenizer.md)
        assert res["auto"]["class"] == "LlamaTokenizerFast" and res["auto"]["lines"] == lines
    pad = result["tokenizers"][0]["auto_slow"]
    assert pad["pad_token"] == "[PAD]" and pad["pad_token_id"] == pad["len"] - 1
    # the transformers-5 directory does not load on 4.x: why --hf-target exists
    assert "SentencePieceBackend does not exist" in result["tokenizers"][2]["auto"]["error"]


def test_transformers5_reads_both_targets(tokenizer_dirs, merged_models, heldout, tmp_path):
    """transformers 5: the default target is exact by default; the transformers4 one through
    SentencePieceBackend.from_pretrained (its documented way); the same probe, this interpreter."""
    jobs = [{"dir": str(tokenizer_dirs["transformers5"]), "modes": ["auto"], "lines": str(heldout), "chat": CHAT},
            {"dir": str(merged_models["transformers5"]), "modes": ["auto"], "lines": str(heldout)},
            {"dir": str(tokenizer_dirs["transformers4"]), "modes": ["sentencepiece_backend", "auto"],
             "lines": str(heldout), "chat": CHAT}]
    result = run_probe(sys.executable, {"tokenizers": jobs}, tmp_path)
    assert result["transformers"].startswith("5.")
    for res, mode in zip(result["tokenizers"], ("auto", "auto", "sentencepiece_backend")):
        assert res[mode]["class"] == "SentencePieceBackend" and res[mode]["mismatches"] == 0, res[mode]
    assert result["tokenizers"][0]["auto"]["chat"] == "<s>" + build_prompt(CHAT[0]["content"])
    assert result["tokenizers"][2]["sentencepiece_backend"]["pad_token"] == "[PAD]"
    assert result["tokenizers"][2]["auto"]["class"] == "LlamaTokenizer"  # loads (tokenizers-backed)


def test_same_logits_on_transformers4_and_5(tf4, merged_models, heldout, tmp_path, base_sp_model):
    d = merged_models["transformers4"]
    sp = processor(d / "tokenizer.model")
    texts = heldout.read_text(encoding="utf-8").splitlines()[:3]
    ids = [[sp.bos_id()] + sp.encode(t)[:40] for t in texts]
    assert max(max(i) for i in ids) >= processor(base_sp_model).get_piece_size()  # rows the PT LoRA added
    out4, out5 = tmp_path / "l4.npy", tmp_path / "l5.npy"
    r4 = run_probe(tf4, {"models": [{"dir": str(d), "ids": ids, "out": str(out4)}]}, tmp_path)["models"][0]
    r5 = run_probe(sys.executable, {"models": [{"dir": str(d), "ids": ids, "out": str(out5)}]}, tmp_path)["models"][0]
    assert r4["class"] == r5["class"] == "LlamaForCausalLM"
    assert r4["vocab_size"] == r5["vocab_size"] == sp.get_piece_size()
    assert r4["rope"]["rope_theta"] == 1e6  # read from the 4.x key the merge added
    l4, l5 = np.load(out4), np.load(out5)
    assert l4.shape == l5.shape == (sum(map(len, ids)), sp.get_piece_size())
    assert float(np.abs(l4 - l5).max()) < 1e-4
    assert float(np.abs(l5).max()) > 1.0  # logits that mean something

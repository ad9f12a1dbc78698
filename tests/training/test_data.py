"""Pre-training blocks, SFT label masking, malformed records, the tokenized-data cache."""

from __future__ import annotations

import json
import shutil

import pytest

from cllama_deploy.errors import InputError
from cllama_deploy.prompts import build_prompt
from cllama_deploy.training import data as D
from cllama_deploy.training.config import PTConfig, SFTConfig
from tests.training import builders_training as bt


def sp(path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(path))


def pt_cfg(model_dir, data_dir, out, **kw):
    kw.setdefault("block_size", 16)
    kw.setdefault("validation_split_percentage", 0.0)
    return PTConfig(model_name_or_path=str(model_dir), dataset_dir=str(data_dir), output_dir=str(out), **kw)


def test_pt_blocks_are_bos_lines_concatenated(tmp_path, merged_tok_dir, merged_model_dir):
    d = tmp_path / "data"
    d.mkdir()
    lines = ["我们今天学习中文。", "", "The model merge adapter.", "北京的天气非常好！"]
    (d / "a.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tok = D.load_text_tokenizer(merged_tok_dir)
    ref = sp(merged_tok_dir / "tokenizer.model")
    stream = []
    for ln in lines:
        if ln.strip():
            stream += [1] + ref.encode(ln)
    for add_eos in (False, True):
        if add_eos:
            stream = []
            for ln in lines:
                if ln.strip():
                    stream += [1] + ref.encode(ln) + [2]
        cfg = pt_cfg(merged_model_dir, d, tmp_path / f"o{add_eos}", block_size=5, add_eos=add_eos)
        res = D.load_pt_data(cfg, tok)
        blocks = [list(r) for r in res.train["input_ids"]]
        n = len(stream) // 5
        assert blocks == [stream[i * 5:(i + 1) * 5] for i in range(n)]  # remainder dropped
        assert res.eval is None


def test_pt_collator_labels_are_inputs():
    batch = D.PTCollator()([{"input_ids": [1, 5, 6]}, {"input_ids": [1, 7, 8]}])
    assert batch["labels"].tolist() == batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 8]]
    assert batch["attention_mask"].sum().item() == 6


def test_validation_split_is_a_real_percentage(tmp_path, merged_tok_dir, merged_model_dir, pt_data_dir):
    tok = D.load_text_tokenizer(merged_tok_dir)
    cfg = pt_cfg(merged_model_dir, pt_data_dir, tmp_path / "o", validation_split_percentage=10.0)
    res = D.load_pt_data(cfg, tok)
    total = len(res.train) + len(res.eval)
    assert len(res.eval) == round(total * 0.10)
    cfg = pt_cfg(merged_model_dir, pt_data_dir, tmp_path / "o", validation_split_percentage=0.001)
    res = D.load_pt_data(cfg, tok)
    assert len(res.eval) == 1  # at least one block, not 0.1% as the seed's fraction meant


def test_cache_hits_and_invalidation(tmp_path, merged_tok_dir, base_sp_model, merged_model_dir):
    d = bt.write_pt_texts(tmp_path / "data", n_files=2, lines=20)
    tok = D.load_text_tokenizer(merged_tok_dir)
    cache = tmp_path / "cache"
    cfg = pt_cfg(merged_model_dir, d, tmp_path / "o", data_cache_dir=str(cache))
    first = D.load_pt_data(cfg, tok)
    assert (first.cache_hits, first.cache_misses) == (0, 2)
    again = D.load_pt_data(cfg, tok)
    assert (again.cache_hits, again.cache_misses) == (2, 0)
    assert list(again.train["input_ids"]) == list(first.train["input_ids"])
    # content change: only that file is re-tokenized
    with open(d / "part1.txt", "a", encoding="utf-8") as fh:
        fh.write("新的一行文本。\n")
    changed = D.load_pt_data(cfg, tok)
    assert (changed.cache_hits, changed.cache_misses) == (1, 1)
    # block size change
    res = D.load_pt_data(pt_cfg(merged_model_dir, d, tmp_path / "o", data_cache_dir=str(cache), block_size=8), tok)
    assert res.cache_misses == 2
    # tokenizer change (another tokenizer file at the same kind of path)
    other = tmp_path / "tok2"
    other.mkdir()
    shutil.copy(base_sp_model, other / "tokenizer.model")
    res = D.load_pt_data(cfg, D.load_text_tokenizer(other))
    assert res.cache_misses == 2
    # add_eos option change
    res = D.load_pt_data(pt_cfg(merged_model_dir, d, tmp_path / "o", data_cache_dir=str(cache), add_eos=True), tok)
    assert res.cache_misses == 2


def test_pt_parallel_tokenization_matches(tmp_path, merged_tok_dir, merged_model_dir):
    d = bt.write_pt_texts(tmp_path / "data", n_files=1, lines=40)
    tok = D.load_text_tokenizer(merged_tok_dir)
    one = D.load_pt_data(pt_cfg(merged_model_dir, d, tmp_path / "a"), tok)
    two = D.load_pt_data(pt_cfg(merged_model_dir, d, tmp_path / "b", preprocessing_num_workers=2), tok)
    assert list(one.train["input_ids"]) == list(two.train["input_ids"])


def sft_cfg(model_dir, data_dir, out, **kw):
    kw.setdefault("validation_split_percentage", 0.0)
    return SFTConfig(model_name_or_path=str(model_dir), dataset_dir=str(data_dir), output_dir=str(out), **kw)


@pytest.mark.parametrize("template", ["alpaca", "alpaca-2"])
def test_sft_label_masking_exact(tmp_path, merged_tok_dir, merged_model_dir, template):
    d = tmp_path / "data"
    d.mkdir()
    recs = [{"instruction": "把下面的句子翻译成英文", "input": "我们喜欢学习。", "output": "We like studying."},
            {"instruction": "Say hello", "output": "你好！"}]
    (d / "x.json").write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    tok = D.load_text_tokenizer(merged_tok_dir)
    ref = sp(merged_tok_dir / "tokenizer.model")
    res = D.load_sft_data(sft_cfg(merged_model_dir, d, tmp_path / "o", prompt_template=template), tok)
    for rec, row in zip(recs, res.train):
        prompt = build_prompt(rec["instruction"], rec.get("input", ""), variant=template)
        src = [1] + ref.encode(prompt)
        tgt = ref.encode(rec["output"]) + [2]
        assert row["input_ids"] == src + tgt
        assert row["labels"] == [-100] * len(src) + tgt


def test_sft_v1_prompt_is_the_seeds(tmp_path):
    assert build_prompt("做什么", "输入") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\n做什么\n输入\n\n### Response: ")


def test_sft_truncation_and_dropping(tmp_path, merged_tok_dir, merged_model_dir):
    d = tmp_path / "data"
    d.mkdir()
    recs = [{"instruction": "短", "output": "这是一个很长的回答" * 10},
            {"instruction": "长" * 200, "output": "不会被学习"}]
    (d / "x.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in recs), encoding="utf-8")
    tok = D.load_text_tokenizer(merged_tok_dir)
    n_prompt = 1 + len(sp(merged_tok_dir / "tokenizer.model").encode(build_prompt("短")))
    limit = n_prompt + 10
    res = D.load_sft_data(sft_cfg(merged_model_dir, d, tmp_path / "o", max_seq_length=limit), tok)
    assert res.dropped == 1 and len(res.train) == 1
    row = res.train[0]
    assert len(row["input_ids"]) == len(row["labels"]) == limit
    assert row["labels"].count(-100) == n_prompt
    assert row["labels"][-1] != -100 and row["input_ids"][-1] != 2  # cut before EOS


@pytest.mark.parametrize("content, where", [
    ('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c"}\n]', ":3: record has no 'output'"),
    ('[\n {"instruction": "a", "output": "b"},\n\n {"instruction": "a", "output": 5}\n]', ":4: 'output' must be a string"),
    ('[\n {"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "b"}\n]', ":3: invalid JSON"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "", "output": "b"}\n', ":2: 'instruction' is empty"),
    ('{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "output": "b"\n', ":3: invalid JSON line"),
    ('[\n "just a string"\n]', ":2: record is str"),
])
def test_malformed_records_name_file_and_line(tmp_path, merged_tok_dir, merged_model_dir, content, where):
    d = tmp_path / "data"
    d.mkdir()
    name = "bad.jsonl" if content.startswith("{") else "bad.json"
    (d / name).write_text(content, encoding="utf-8")
    tok = D.load_text_tokenizer(merged_tok_dir)
    with pytest.raises(InputError) as info:
        D.load_sft_data(sft_cfg(merged_model_dir, d, tmp_path / "o"), tok)
    assert f"{name}{where}" in str(info.value)


def test_sft_collator_pads():
    batch = D.SFTCollator(pad_id=0)([{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]},
                                     {"input_ids": [1, 7], "labels": [-100, 7]}])
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_missing_files_errors(tmp_path, merged_tok_dir, merged_model_dir):
    (tmp_path / "empty").mkdir()
    tok = D.load_text_tokenizer(merged_tok_dir)
    with pytest.raises(InputError, match="no .txt files"):
        D.load_pt_data(pt_cfg(merged_model_dir, tmp_path / "empty", tmp_path / "o"), tok)
    with pytest.raises(InputError, match="no .json or .jsonl"):
        D.load_sft_data(sft_cfg(merged_model_dir, tmp_path / "empty", tmp_path / "o"), tok)

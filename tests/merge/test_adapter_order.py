"""Adapters applied to a model they were not trained on (issue 14 item 1): with `train sft`'s default
modules_to_save the shapes fit in any order, so the order is checked from what the adapters carry."""

from __future__ import annotations

import json
import shutil

import pytest

from cllama_deploy.cli import main
from cllama_deploy.errors import CheckpointError, ShapeMismatchError
from cllama_deploy.merge import merged_source
from tests.merge.builders_lora import lora_pair, make_adapter, make_tokenizer_dir, write_adapter

pytestmark = pytest.mark.slow


def _cli_error(argv, capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_the_right_order_merges(trained_case):
    c = trained_case
    source = merged_source(c.base, [c.pt, c.sft])
    assert source.config["vocab_size"] == c.vocab + 1  # the [PAD] row of the SFT tokenizer
    assert merged_source(c.base, [c.pt, c.sft_same]).config["vocab_size"] == c.vocab
    assert merged_source(c.base, [c.pt]).config["vocab_size"] == c.vocab


def test_sft_without_its_pt_adapter_is_refused(trained_case, tmp_path, capsys):
    c = trained_case
    with pytest.raises(CheckpointError, match=rf"{c.sft} was trained on top of {c.pt} \(.*sft_training_config.json "
                       rf"lists it under --lora\), which is not given before it: pass --lora {c.pt} --lora {c.sft}"):
        merged_source(c.base, [c.sft])
    out = tmp_path / "merged"
    err = _cli_error(["merge", "--base", str(c.base), "--lora", str(c.sft), "--out", str(out)], capsys)
    assert "--no-check-adapter-order" in err
    assert not out.exists()
    # deploy refuses it the same way, before writing anything
    err = _cli_error(["deploy", "--base", str(c.base), "--lora", str(c.sft), "--out", str(tmp_path / "d"), "-q"],
                     capsys)
    assert "trained on top of" in err
    assert not list((tmp_path / "d").glob("*.gguf*"))


def test_reversed_order_is_refused(trained_case):
    c = trained_case
    # the [PAD] SFT adapter saves one row more than the PT adapter: the vocabulary would shrink
    with pytest.raises(ShapeMismatchError, match=rf"{c.pt}: .* has {c.vocab} vocabulary rows but .* already has "
                       rf"{c.vocab + 1} rows from {c.sft}: .*wrong order; pass --lora {c.pt} before --lora {c.sft}"):
        merged_source(c.base, [c.sft, c.pt])
    # same rows: the shapes cannot tell, the SFT adapter's training record can
    with pytest.raises(CheckpointError, match=rf"{c.sft_same} was trained on top of {c.pt} .*must come after it: "
                       rf"pass --lora {c.pt} before --lora {c.sft_same}"):
        merged_source(c.base, [c.sft_same, c.pt])


def test_the_override_merges_as_told(trained_case, tmp_path, capsys):
    c = trained_case
    out = tmp_path / "o"
    assert main(["merge", "--base", str(c.base), "--lora", str(c.sft), "--lora", str(c.pt), "--out", str(out),
                 "--no-check-adapter-order", "-q"]) == 0, capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["vocab_size"] == c.vocab


def test_record_travels_with_a_copied_adapter(trained_case, tmp_path):
    """A copy that carries its record (inside the adapter directory), with paths relative to where the
    training ran: they are resolved from the recorded output_dir."""
    c = trained_case
    run = tmp_path / "runs"
    shutil.copytree(c.pt, run / "pt" / "pt_lora_model")
    sft = shutil.copytree(c.sft, run / "sft" / "sft_lora_model")
    record = json.loads((c.sft.parent / "sft_training_config.json").read_text())
    record.update(output_dir="sft", lora=["pt/pt_lora_model"], model_name_or_path=str(c.base))
    (sft / "sft_training_config.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=rf"trained on top of {run / 'pt' / 'pt_lora_model'}"):
        merged_source(c.base, [sft])
    # the same adapter at another path counts as the one the record names (same weights)
    assert merged_source(c.base, [c.pt, sft]).config["vocab_size"] == c.vocab + 1
    # another adapter in its place is refused
    other = write_adapter(tmp_path / "other", lora_pair("model.layers.0.self_attn.q_proj", 4, 64, 64))
    with pytest.raises(CheckpointError, match=rf"trained on top of .*pt_lora_model .* but {other} is given before it"):
        merged_source(c.base, [other, sft])


def test_an_adapter_trained_on_the_base_alone_after_another(trained_case, tmp_path):
    """An SFT adapter trained straight on the base (no --lora) does not go on top of the PT adapter."""
    c = trained_case
    alone = shutil.copytree(c.sft, tmp_path / "alone" / "sft_lora_model")
    record = json.loads((c.sft.parent / "sft_training_config.json").read_text())
    record.update(lora=[])
    (alone.parent / "sft_training_config.json").write_text(json.dumps(record))
    (alone / "sft_training_config.json").write_text(json.dumps(record))  # training writes it inside too
    with pytest.raises(CheckpointError, match=rf"{alone} was trained on the base with no adapter merged before it .*"
                       rf"but {c.pt} come\(s\) before it"):
        merged_source(c.base, [c.pt, alone])


def test_continued_adapter_is_not_stacked_on_what_it_continued(trained_case, tmp_path):
    c = trained_case
    cont = shutil.copytree(c.pt, tmp_path / "more" / "pt_lora_model")
    record = json.loads((c.pt.parent / "pt_training_config.json").read_text())
    record.update(peft_path=str(c.pt), output_dir=str(cont.parent))
    (cont.parent / "pt_training_config.json").write_text(json.dumps(record))
    (cont / "pt_training_config.json").write_text(json.dumps(record))  # training writes it inside too
    with pytest.raises(CheckpointError, match=rf"{cont} continued the training of {c.pt} .*without --lora {c.pt}"):
        merged_source(c.base, [c.pt, cont], check_tokenizer=False)


def test_seed_style_sft_on_a_merged_model_claims_that_base(trained_case, tmp_path):
    """No training record (e.g. the seed's scripts): PEFT's base_model_name_or_path names the merged PT model
    the SFT adapter was trained on; its vocabulary differs from --base, so --base alone is refused."""
    import warnings

    import torch
    from transformers import AutoModelForCausalLM

    from cllama_deploy.merge import MergeConfig, merge

    c = trained_case
    merged_pt = tmp_path / "merged_pt"
    merge(MergeConfig(base=c.base, loras=[c.pt], out=merged_pt, show_progress=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(str(merged_pt), dtype=torch.float32)
        sft = make_adapter(model, tmp_path / "seed_sft", modules_to_save=["embed_tokens", "lm_head"],
                           tokenizer_dir=c.tok)
    assert json.loads((sft / "adapter_config.json").read_text())["base_model_name_or_path"] == str(merged_pt)
    with pytest.raises(CheckpointError, match=rf"{sft} was trained on {merged_pt} \({c.vocab} tokens; "
                       rf"base_model_name_or_path .* applied to --base {c.base} \(512 rows\): pass --base {merged_pt}"):
        merged_source(c.base, [sft])
    assert merged_source(merged_pt, [sft]).config["vocab_size"] == c.vocab
    assert merged_source(c.base, [c.pt, sft]).config["vocab_size"] == c.vocab


def test_a_middle_adapters_tokenizer_must_match_its_rows(plus_case, lora_sp_model, tmp_path):
    """Every adapter's own tokenizer, not only the last one's, says which vocabulary it was trained with."""
    mid = write_adapter(tmp_path / "mid", lora_pair("model.layers.0.self_attn.q_proj", 4, 64, 64))
    make_tokenizer_dir(mid, lora_sp_model)  # the base's 512-piece tokenizer: trained on the base, not on PT
    with pytest.raises(ShapeMismatchError, match=rf"{mid}: its tokenizer has 512 tokens but after this adapter the "
                       r"model has 555 vocabulary rows"):
        merged_source(plus_case.base, [plus_case.pt, mid, plus_case.sft])
    assert merged_source(plus_case.base, [plus_case.pt, mid, plus_case.sft],
                         check_order=False).config["vocab_size"] == 556

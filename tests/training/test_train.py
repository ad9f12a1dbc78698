"""End-to-end LoRA runs on a tiny random LLaMA: loss goes down, the adapter loads in peft and merges with
our streaming merge, resume is exact, SFT can start from the PT adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cllama_deploy.training.config import PTConfig, SFTConfig
from cllama_deploy.training.run import train

pytestmark = pytest.mark.slow

TINY = dict(logging_steps=5, save_steps=1000, eval_before_train=True, progress_bar=False,
            lora_rank=4, lora_alpha=8.0, lora_dropout=0.0, seed=3)


@pytest.fixture(scope="module")
def pt_run(tmp_path_factory, base_model_dir, merged_tok_dir, pt_data_dir):
    """PT on the 512-row base with the merged tokenizer (vocabulary resized, mean-of-pieces init)."""
    out = tmp_path_factory.mktemp("pt_out")
    cfg = PTConfig(model_name_or_path=str(base_model_dir), tokenizer_name_or_path=str(merged_tok_dir),
                   dataset_dir=str(pt_data_dir), output_dir=str(out), block_size=32,
                   per_device_train_batch_size=4, max_steps=30, learning_rate=5e-3, warmup_ratio=0.1,
                   validation_split_percentage=10.0, **TINY)
    return cfg, train(cfg)


def test_pt_reduces_eval_loss(pt_run):
    _cfg, res = pt_run
    assert res.global_step == 30
    assert res.eval_loss < res.initial_eval_loss - 0.5, (res.initial_eval_loss, res.eval_loss)
    assert res.tokens == 30 * 4 * 32 and res.tokens_per_second > 0
    assert res.eval_perplexity == pytest.approx(2.718281828 ** res.eval_loss, rel=1e-6)


def test_pt_adapter_format(pt_run, merged_size):
    from safetensors import safe_open

    _cfg, res = pt_run
    d = res.adapter_dir
    assert d.name == "pt_lora_model"
    conf = json.loads((d / "adapter_config.json").read_text())
    assert conf["r"] == 4 and conf["lora_alpha"] == 8.0 and conf["peft_type"] == "LORA"
    assert set(conf["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"}
    assert set(conf["modules_to_save"]) == {"embed_tokens", "lm_head"}
    assert (d / "tokenizer.model").is_file() and (d / "tokenizer_config.json").is_file()
    with safe_open(str(d / "adapter_model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
        assert fh.get_slice("base_model.model.model.embed_tokens.weight").get_shape() == [merged_size, 64]
        assert fh.get_slice("base_model.model.lm_head.weight").get_shape() == [merged_size, 64]
    assert sum(".lora_A." in k for k in keys) == 2 * 7
    assert not list(d.parent.glob("*.partial"))


def _ids(merged_size):
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(3, merged_size, (2, 24), generator=g)


def test_adapter_loads_in_peft_and_merges_with_ours(pt_run, base_model_dir, merged_size):
    """PeftModel.from_pretrained + merge_and_unload == cllama_deploy.merge (numpy, streaming)."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    from cllama_deploy.merge import merged_source

    _cfg, res = pt_run
    ids = _ids(merged_size)
    base = AutoModelForCausalLM.from_pretrained(base_model_dir)
    base.resize_token_embeddings(merged_size, mean_resizing=False)
    peft_model = PeftModel.from_pretrained(base, res.adapter_dir).eval()
    with torch.no_grad():
        want = peft_model(ids).logits
        ref = peft_model.merge_and_unload()(ids).logits
    torch.testing.assert_close(ref, want, rtol=1e-4, atol=1e-4)

    src = merged_source(base_model_dir, [res.adapter_dir])
    config = AutoConfig.from_pretrained(base_model_dir)
    config.vocab_size = merged_size
    ours = LlamaForCausalLM(config).eval()
    state = {name: torch.from_numpy(src.get(name).copy()) for name in src.names()}
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    with torch.no_grad():
        got = ours(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


class StopAt:
    """A TrainerCallback that interrupts training at a step (as a kill after a checkpoint would)."""

    def __new__(cls, step):
        from transformers import TrainerCallback

        class _Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step >= step:
                    control.should_training_stop = True

        return _Stop()


def _tensors(adapter_dir):
    from safetensors.numpy import load_file

    return {k: v.tobytes() for k, v in load_file(str(adapter_dir / "adapter_model.safetensors")).items()}


def _losses(history):
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def test_resume_is_exact(tmp_path, merged_model_dir, merged_tok_dir, pt_data_dir, capsys):
    """A plain re-run of an interrupted run resumes it (no --resume needed; issue 14 item 3), says from which
    checkpoint, and continues with the losses of a run that was never interrupted."""
    common = dict(model_name_or_path=str(merged_model_dir), tokenizer_name_or_path=str(merged_tok_dir),
                  dataset_dir=str(pt_data_dir), data_cache_dir=str(tmp_path / "cache"), block_size=32,
                  per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=8,
                  learning_rate=5e-3, validation_split_percentage=0.0, logging_steps=1, save_steps=4,
                  progress_bar=False, lora_rank=4, lora_dropout=0.1, seed=5)
    full = train(PTConfig(output_dir=str(tmp_path / "full"), **common))
    part = train(PTConfig(output_dir=str(tmp_path / "part"), **common), callbacks=[StopAt(4)])
    assert part.global_step == 4 and (tmp_path / "part" / "checkpoint-4").is_dir()
    # a checkpoint cut short by a kill while saving (no trainer_state.json yet) is skipped
    (tmp_path / "part" / "checkpoint-5").mkdir()
    (tmp_path / "part" / "checkpoint-5" / "adapter_model.safetensors").write_bytes(b"partial")
    capsys.readouterr()
    resumed = train(PTConfig(output_dir=str(tmp_path / "part"), **common))
    err = capsys.readouterr().err
    assert f"resuming from {tmp_path / 'part' / 'checkpoint-4'} (step 4 of 8; found in --output_dir" in err
    assert "skipping checkpoint-5: cut short while saving" in err
    assert resumed.resumed_from.endswith("checkpoint-4") and resumed.global_step == 8
    a, b = _losses(full.log_history), _losses(resumed.log_history)
    assert [s for s in b if s > 4] == [5, 6, 7, 8]
    for step in (5, 6, 7, 8):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a, b)
    assert _losses(part.log_history) == {s: a[s] for s in (1, 2, 3, 4)}

    # a re-run of the finished run trains nothing (the Trainer alone would train a 9th step) and writes the
    # adapter of its last checkpoint
    capsys.readouterr()
    done = train(PTConfig(output_dir=str(tmp_path / "part"), **common))
    assert "checkpoint-8 is the last step of the run: nothing left to train" in capsys.readouterr().err
    assert done.global_step == 8 and max(_losses(done.log_history)) == 8
    assert _tensors(done.adapter_dir) == _tensors(tmp_path / "part" / "checkpoint-8")

    # --overwrite_output_dir deletes the run's checkpoints and starts over
    again = train(PTConfig(output_dir=str(tmp_path / "part"), **dict(common, max_steps=2, save_steps=1000),
                           overwrite_output_dir=True))
    assert again.resumed_from is None and again.global_step == 2
    assert sorted(p.name for p in (tmp_path / "part").glob("checkpoint-*")) == ["checkpoint-2"]
    assert _losses(again.log_history) == {1: a[1], 2: a[2]}


def test_every_checkpoint_is_deployable(pt_run, base_model_dir, merged_size, tmp_path):
    """checkpoint-N/ carries the training tokenizer and record as the final adapter does (issue 9 item 6):
    `merge` and `deploy` of a checkpoint work and give the final adapter's model."""
    import numpy as np

    from cllama_deploy.cli import main as cli_main
    from cllama_deploy.checkpoint.hf import open_hf
    from cllama_deploy.gguf.reader import scan_gguf

    cfg, res = pt_run
    ckpt = Path(cfg.output_dir) / "checkpoint-30"  # the Trainer saves at the last step
    assert (ckpt / "trainer_state.json").is_file()
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "pt_training_config.json"):
        assert (ckpt / name).read_bytes() == (res.adapter_dir / name).read_bytes(), name
    assert cli_main(["merge", "--base", str(base_model_dir), "--lora", str(ckpt), "--out", str(tmp_path / "m")]) == 0
    assert cli_main(["merge", "--base", str(base_model_dir), "--lora", str(res.adapter_dir),
                     "--out", str(tmp_path / "final")]) == 0
    got, want = open_hf(tmp_path / "m"), open_hf(tmp_path / "final")
    assert got.config["vocab_size"] == merged_size and sorted(got.names()) == sorted(want.names())
    for name in want.names():
        np.testing.assert_array_equal(got.get(name), want.get(name))
    assert (tmp_path / "m" / "tokenizer.model").read_bytes() == (res.adapter_dir / "tokenizer.model").read_bytes()
    assert cli_main(["deploy", "--base", str(base_model_dir), "--lora", str(ckpt), "--quant", "F16",
                     "--out", str(tmp_path / "d"), "--name", "ckpt", "--threads", "1"]) == 0
    assert scan_gguf(tmp_path / "d" / "ckpt-F16.gguf").fields["tokenizer.ggml.tokens"].count == merged_size


def test_progress_bar_shows_a_loss_not_nan(tmp_path, merged_model_dir, merged_tok_dir, pt_data_dir, capsys):
    """A run shorter than --logging_steps used to end on `loss nan` (issue 14 item 9): the bar shows the
    train loss then, and a dash (never nan) before any loss is known."""
    cfg = PTConfig(model_name_or_path=str(merged_model_dir), tokenizer_name_or_path=str(merged_tok_dir),
                   dataset_dir=str(pt_data_dir), output_dir=str(tmp_path / "o"), block_size=32,
                   per_device_train_batch_size=2, max_steps=5, logging_steps=10, logging_first_step=False,
                   validation_split_percentage=0.0, save_steps=1000, lora_rank=4, progress_bar=True)
    capsys.readouterr()
    res = train(cfg)
    err = capsys.readouterr().err
    assert "nan" not in err.lower()
    bar = [ln for ln in err.splitlines() if ln.startswith("training") and "5/5" in ln]
    assert bar and f"loss {res.train_loss:.4f}" in bar[-1], err


def test_progress_bar_before_the_first_log():
    from transformers import TrainerControl, TrainerState

    from cllama_deploy.training.run import NO_LOSS, _make_progress_callback

    cb = _make_progress_callback(True)
    state, control = TrainerState(max_steps=5, is_world_process_zero=True), TrainerControl()
    cb.on_train_begin(None, state, control)
    try:
        shown = lambda: cb.bar.tasks[0].fields["loss"]  # noqa: E731
        assert shown() == NO_LOSS
        state.global_step = 1
        cb.on_step_end(None, state, control)
        assert shown() == NO_LOSS
        cb.on_log(None, state, control, logs={"loss": 2.5, "learning_rate": 1e-4})
        assert shown() == "2.5000"
        cb.on_log(None, state, control, logs={"train_loss": 3.0})  # the end-of-run average does not replace it
        assert shown() == "2.5000"
    finally:
        cb.on_train_end(None, state, control)


def test_sft_from_pt_adapter_reduces_eval_loss(tmp_path, pt_run, base_model_dir, merged_tok_dir, sft_data_dir,
                                               merged_size):
    """The 'Plus' recipe: the PT adapter is merged in memory (vocabulary grows with it), then SFT."""
    from safetensors import safe_open

    _cfg, pt = pt_run
    # the bare tokenizer.model file this time: the adapter's HF tokenizer files are generated
    cfg = SFTConfig(model_name_or_path=str(base_model_dir),
                    tokenizer_name_or_path=str(merged_tok_dir / "tokenizer.model"),
                    dataset_dir=str(sft_data_dir), output_dir=str(tmp_path / "sft"), lora=[str(pt.adapter_dir)],
                    max_seq_length=160, per_device_train_batch_size=4, max_steps=30, learning_rate=5e-3,
                    modules_to_save="none", validation_split_percentage=10.0, **TINY)
    res = train(cfg)
    assert res.eval_loss < res.initial_eval_loss - 0.3, (res.initial_eval_loss, res.eval_loss)
    assert res.adapter_dir.name == "sft_lora_model"
    assert (res.adapter_dir / "tokenizer.model").is_file() and (res.adapter_dir / "tokenizer_config.json").is_file()
    with safe_open(str(res.adapter_dir / "adapter_model.safetensors"), "pt") as fh:
        assert all("lora_" in k for k in fh.keys())
    # SFT tokens are counted without padding
    assert 0 < res.tokens <= 30 * 4 * 160


def test_sft_with_pad_tokenizer_on_top_of_pt_adapter(tmp_path, pt_run, base_model_dir, base_sp_model,
                                                     zh_sp_model, sft_data_dir, merged_size):
    """The seed's Chinese-Alpaca-Plus: PT adapter grew the vocabulary to N (merged tokenizer), SFT uses the
    N+1 tokenizer with [PAD]. The row added by SFT is planned against the PT adapter's tokenizer, not the
    base model's (whose size no longer matches the pre-merged model)."""
    from safetensors import safe_open

    from cllama_deploy.tokenizer.merge import TokenizerMergeConfig, merge_tokenizers

    pad_tok = tmp_path / "tok_pad"
    merge_tokenizers(TokenizerMergeConfig(base=base_sp_model, add=zh_sp_model, out=pad_tok, pad_token=True))
    _cfg, pt = pt_run
    cfg = SFTConfig(model_name_or_path=str(base_model_dir), tokenizer_name_or_path=str(pad_tok),
                    dataset_dir=str(sft_data_dir), output_dir=str(tmp_path / "sft"), lora=[str(pt.adapter_dir)],
                    max_seq_length=160, per_device_train_batch_size=4, max_steps=4, validation_split_percentage=10.0,
                    **TINY)
    res = train(cfg)
    with safe_open(str(res.adapter_dir / "adapter_model.safetensors"), "pt") as fh:
        rows = {k: fh.get_slice(k).get_shape()[0] for k in fh.keys() if "lora_" not in k}
    assert rows and set(rows.values()) == {merged_size + 1}, rows


def test_deepspeed_flag_without_the_package(tmp_path, merged_model_dir, pt_data_dir):
    """--deepspeed passes through to TrainingArguments; without the package the error says what to do."""
    import importlib.util

    from cllama_deploy.errors import DependencyError

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here; the pass-through is exercised by real runs")
    cfg = PTConfig(model_name_or_path=str(merged_model_dir), dataset_dir=str(pt_data_dir),
                   output_dir=str(tmp_path / "o"), max_steps=1,
                   deepspeed=str(Path(__file__).resolve().parents[2] / "training" / "ds_zero2_no_offload.json"))
    with pytest.raises(DependencyError, match="pip install deepspeed"):
        train(cfg)


def test_peft_path_continues_the_adapter(tmp_path, pt_run, base_model_dir, merged_tok_dir, pt_data_dir):
    """--peft_path loads the adapter as trainable: training starts where the PT run ended."""
    cfg0, pt = pt_run
    cfg = PTConfig(model_name_or_path=str(base_model_dir), tokenizer_name_or_path=str(merged_tok_dir),
                   dataset_dir=str(pt_data_dir), output_dir=str(tmp_path / "more"), peft_path=str(pt.adapter_dir),
                   block_size=32, per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3,
                   validation_split_percentage=10.0, **TINY)
    res = train(cfg)
    assert res.initial_eval_loss == pytest.approx(pt.eval_loss, rel=1e-5)
    assert res.trainable_params == pt.trainable_params


def test_resume_after_sigkill(tmp_path, merged_model_dir, merged_tok_dir, pt_data_dir):
    """A run killed with SIGKILL loses at most the steps since its last complete checkpoint; resuming
    continues from there with the same losses as a run that was never interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time

    flags = dict(model_name_or_path=str(merged_model_dir), tokenizer_name_or_path=str(merged_tok_dir),
                 dataset_dir=str(pt_data_dir), data_cache_dir=str(tmp_path / "cache"), block_size=32,
                 per_device_train_batch_size=2, max_steps=60, learning_rate=5e-3,
                 validation_split_percentage=0.0, logging_steps=1, save_steps=4, lora_rank=4, seed=7)
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "cllama_deploy.training", "pt", "--output_dir", str(killed), "--no_progress_bar"]
    for k, v in flags.items():
        cmd += [f"--{k}", str(v)]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    try:
        while not (killed / "checkpoint-8" / "trainer_state.json").is_file():
            assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint-8 within 300 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "pt_lora_model").exists()  # no final adapter from a killed run

    resumed = train(PTConfig(output_dir=str(killed), resume="latest", progress_bar=False, **flags))
    start = int(resumed.resumed_from.rsplit("-", 1)[1])
    assert start >= 8 and start % 4 == 0 and resumed.global_step == 60
    full = train(PTConfig(output_dir=str(tmp_path / "full"), progress_bar=False, **flags))
    a, b = _losses(full.log_history), _losses(resumed.log_history)
    assert sorted(s for s in b if s > start) == list(range(start + 1, 61))
    for step in range(start + 1, 61):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a[step], b[step])

"""What `train` decides before torch is imported (:func:`cllama_deploy.training.run.prepare`): which checkpoint a
re-run resumes and what it says about it, what --overwrite_output_dir would delete, checkpoints of another run;
and that these mistakes are reported in one line without loading torch, transformers, peft or datasets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cllama_deploy.errors import ConfigError
from cllama_deploy.training.config import PTConfig, SFTConfig, config_record
from cllama_deploy.training.run import prepare
from cllama_deploy.training.stages import PT, SFT, STAGES, stage_of

ROOT = Path(__file__).resolve().parents[2]


def _cfg(model, data, out, **kw):
    return PTConfig(model_name_or_path=str(model), dataset_dir=str(data), output_dir=str(out), **kw)


def _checkpoint(out: Path, step: int, complete: bool = True, record: dict | None = None,
                record_name: str = "pt_training_config.json") -> Path:
    d = out / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(b"x")
    if complete:
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if record is not None:
        (d / record_name).write_text(json.dumps(record))
    return d


def test_stage_objects():
    assert set(STAGES) == {"pt", "sft"} and STAGES["pt"] is PT and STAGES["sft"] is SFT
    assert (PT.adapter_name, PT.record_name) == ("pt_lora_model", "pt_training_config.json")
    assert PT.config is PTConfig and SFT.config is SFTConfig


def test_rerun_resumes_the_latest_complete_checkpoint_and_says_which(tmp_path, merged_model_dir, pt_data_dir):
    out = tmp_path / "o"
    _checkpoint(out, 2)
    four = _checkpoint(out, 4)
    _checkpoint(out, 6, complete=False)  # killed while saving
    plan = prepare(_cfg(merged_model_dir, pt_data_dir, out, max_steps=8))
    assert plan.resume_from == four and plan.to_delete == [] and plan.stage is PT
    assert any(n.startswith("skipping checkpoint-6: cut short while saving") for n in plan.notes), plan.notes
    assert f"resuming from {four} (step 4 of 8; found in --output_dir; --overwrite_output_dir starts over " \
           f"instead)" in plan.notes
    # --resume insists on the same; --resume DIR picks another
    assert prepare(_cfg(merged_model_dir, pt_data_dir, out, resume="latest")).resume_from == four
    two = prepare(_cfg(merged_model_dir, pt_data_dir, out, resume=str(out / "checkpoint-2")))
    assert two.resume_from == out / "checkpoint-2"
    assert f"resuming from {out / 'checkpoint-2'} (step 2; --resume)" in two.notes


def test_a_checkpoint_at_the_last_step_finishes_the_run(tmp_path, merged_model_dir, pt_data_dir):
    out = tmp_path / "o"
    eight = _checkpoint(out, 8)
    plan = prepare(_cfg(merged_model_dir, pt_data_dir, out, max_steps=8))
    assert plan.finished and plan.resume_from == eight
    assert "checkpoint-8 is the last step of the run: nothing left to train; the adapter is written from it" \
        in plan.notes
    longer = prepare(_cfg(merged_model_dir, pt_data_dir, out, max_steps=12))
    assert not longer.finished and longer.resume_from == eight
    # --num_train_epochs: the Trainer's own step count, recorded in the checkpoint's state
    (eight / "trainer_state.json").write_text(json.dumps({"global_step": 8, "max_steps": 8, "num_train_epochs": 2}))
    assert prepare(_cfg(merged_model_dir, pt_data_dir, out, num_train_epochs=2.0)).finished
    assert not prepare(_cfg(merged_model_dir, pt_data_dir, out, num_train_epochs=3.0)).finished


def test_overwrite_plans_the_deletion_and_deletes_nothing_yet(tmp_path, merged_model_dir, pt_data_dir):
    out = tmp_path / "o"
    ckpts = [_checkpoint(out, 2), _checkpoint(out, 4, complete=False)]
    plan = prepare(_cfg(merged_model_dir, pt_data_dir, out, overwrite_output_dir=True))
    assert plan.resume_from is None and plan.to_delete == ckpts
    assert all(p.is_dir() for p in ckpts)
    assert any("--overwrite_output_dir: deleting checkpoint-2, checkpoint-4" in n for n in plan.notes)


def test_only_incomplete_checkpoints_start_over_with_a_note(tmp_path, merged_model_dir, pt_data_dir):
    out = tmp_path / "o"
    _checkpoint(out, 3, complete=False)
    plan = prepare(_cfg(merged_model_dir, pt_data_dir, out))
    assert plan.resume_from is None and plan.to_delete == []
    assert any("ignoring checkpoint-3" in n and "starting from step 0" in n for n in plan.notes)
    with pytest.raises(ConfigError, match="--resume: no complete checkpoint"):
        prepare(_cfg(merged_model_dir, pt_data_dir, out, resume="latest"))
    with pytest.raises(ConfigError, match="not a complete Trainer checkpoint"):
        prepare(_cfg(merged_model_dir, pt_data_dir, out, resume=str(out / "checkpoint-3")))


def test_checkpoint_of_another_run_is_refused(tmp_path, merged_model_dir, pt_data_dir):
    cfg = _cfg(merged_model_dir, pt_data_dir, tmp_path / "o", seed=11)
    record = config_record(cfg)
    _checkpoint(tmp_path / "o", 4, record=dict(record, lora_rank=16))
    with pytest.raises(ConfigError, match=r"trained with --lora_rank 16, this run has 8.*--overwrite_output_dir"):
        prepare(cfg)
    _checkpoint(tmp_path / "s", 4, record=record, record_name="sft_training_config.json")
    with pytest.raises(ConfigError, match=r"checkpoint of `train sft`, not `train pt`"):
        prepare(_cfg(merged_model_dir, pt_data_dir, tmp_path / "s"))


def test_resume_takes_the_checkpoints_seed_and_names_changed_options(tmp_path, merged_model_dir, pt_data_dir):
    """The recipes pass --seed $RANDOM: the resumed run must keep the data order of the run it continues."""
    first = _cfg(merged_model_dir, pt_data_dir, tmp_path / "o", seed=11)
    _checkpoint(tmp_path / "o", 4, record=config_record(first))
    again = _cfg(merged_model_dir, pt_data_dir, tmp_path / "o", seed=12345, learning_rate=1e-3)
    plan = prepare(again)
    assert plan.cfg.seed == 11 and again.seed == 12345  # the caller's config is not changed
    assert any("--seed: using 11, the seed of the run being resumed (given: 12345)" in n for n in plan.notes)
    assert any("--learning_rate 0.0002 → 0.001" in n for n in plan.notes), plan.notes


def test_check_flag_reports_and_stops(tmp_path, merged_model_dir, pt_data_dir, capsys):
    from cllama_deploy.training.run import train

    out = tmp_path / "o"
    four = _checkpoint(out, 4)
    assert train(_cfg(merged_model_dir, pt_data_dir, out, check=True)) is None
    err = capsys.readouterr().err
    assert f"resuming from {four} (step 4;" in err and "check passed: `train pt` would read 2 file(s)" in err
    assert not (out / "pt_lora_model").exists()


def test_stage_of():
    class Fake:
        stage = "sft"

    assert stage_of(Fake()) is SFT


# One process for several mistakes: each must exit 2 with one line, and none may load the heavy libraries.
_FAST_ERRORS = r"""
import contextlib, io, json, sys
from cllama_deploy.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        rc = main(argv)
    out.append([rc, buf.getvalue()])
heavy = sorted(m for m in ("torch", "transformers", "peft", "datasets", "accelerate") if m in sys.modules)
print(json.dumps({"results": out, "heavy": heavy}))
"""


def test_trivial_errors_are_found_before_the_heavy_imports(tmp_path, merged_model_dir, base_sp_model,
                                                           merged_tok_dir, pt_data_dir, sft_data_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    common = ["--model_name_or_path", str(merged_model_dir), "--output_dir", str(tmp_path / "o")]
    cases = {
        "no .txt files": ["train", "pt", "--dataset_dir", str(empty)] + common,
        "has 512 pieces but the model has": ["train", "pt", "--dataset_dir", str(pt_data_dir),
                                             "--tokenizer_name_or_path", str(base_sp_model)] + common,
        "--resume: no complete checkpoint": ["train", "sft", "--dataset_dir", str(sft_data_dir),
                                             "--tokenizer_name_or_path", str(merged_tok_dir), "--resume"] + common,
        "--do_eval needs validation data": ["train", "sft", "--dataset_dir", str(sft_data_dir), "--do_eval",
                                            "--validation_split_percentage", "0"] + common,
        "did you mean --lora_rank": ["train", "pt", "--dataset_dir", str(pt_data_dir), "--lora_rnk", "4"] + common,
        "point --model_name_or_path at": ["train", "pt", "--dataset_dir", str(pt_data_dir), "--model_name_or_path",
                                          str(empty), "--tokenizer_name_or_path", str(merged_tok_dir),
                                          "--output_dir", str(tmp_path / "o")],
        "--lora: ": ["train", "sft", "--dataset_dir", str(sft_data_dir), "--lora", str(empty)] + common,
    }
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="400")
    proc = subprocess.run([sys.executable, "-c", _FAST_ERRORS, json.dumps(list(cases.values()))], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for (want, _argv), (rc, err) in zip(cases.items(), got["results"]):
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and want in lines[0] and lines[0].startswith("error:"), (want, err)
    assert got["heavy"] == []

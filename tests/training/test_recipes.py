"""The launch recipes training/run_pt.sh and run_sft.sh, run as an operator runs them (bash, torchrun, one CPU
process): a re-run after a crash resumes instead of deleting the checkpoints (issue 14 item 3), option
mistakes are one line before torchrun starts, an error inside training is printed last (issue 14 item 12)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# What a CPU machine needs on top of the recipes' GPU settings (a later flag wins), and a tiny run.
CPU = ["--no_fp16", "--torch_dtype", "float32", "--no_gradient_checkpointing", "--preprocessing_num_workers", "1",
       "--lora_rank", "4", "--no_progress_bar"]


def _env(model, tok, data, out, **extra):
    bin_dir = str(Path(sys.executable).parent)  # the venv's python and torchrun
    return dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""), PYTHON=sys.executable,
                PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1",
                PRETRAINED_MODEL=str(model), TOKENIZER=str(tok), DATASET_DIR=str(data), OUTPUT_DIR=str(out),
                DATA_CACHE=str(out.parent / "cache"), DEEPSPEED="0", NPROC="1", COLUMNS="400", **extra)


def _recipe(stage: str, env: dict, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "training" / f"run_{stage}.sh"), *CPU, *args], env=env,
                          capture_output=True, text=True, timeout=600, **kw)


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (torchrun starts its workers in sessions of their own, so killing the
    launch's process group would leave the worker training)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += parents.get(p, [])
    return tree


def _kill_tree(pid: int) -> None:
    for p in _process_tree(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_rerun_after_a_crash_resumes(tmp_path, merged_model_dir, merged_tok_dir, pt_data_dir):
    """Kill a run_pt.sh run (torchrun and its worker) after a checkpoint; running the same command again
    continues from the latest complete checkpoint. Before the fix the recipe's --overwrite_output_dir
    deleted the checkpoints and started over, and `--resume` was refused."""
    out = tmp_path / "pt"
    env = _env(merged_model_dir, merged_tok_dir, pt_data_dir, out)
    run = ["--block_size", "32", "--per_device_train_batch_size", "2", "--max_steps", "60", "--save_steps", "4",
           "--logging_steps", "1", "--validation_split_percentage", "0"]
    proc = subprocess.Popen(["bash", str(ROOT / "training" / "run_pt.sh"), *CPU, *run], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 400
    try:
        while not (out / "checkpoint-8" / "trainer_state.json").is_file():
            assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint-8 within 400 s"
            time.sleep(0.02)
        _kill_tree(proc.pid)  # the whole launch: bash, torchrun and the worker, as a crash of the machine
    finally:
        proc.kill()
        proc.wait()
    time.sleep(1)
    assert not (out / "pt_lora_model").exists()
    first = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")
                   if (p / "trainer_state.json").is_file())

    again = _recipe("pt", env, *run)
    assert again.returncode == 0, again.stderr[-5000:]
    start = first[-1]
    assert start >= 8
    assert f"resuming from {out / f'checkpoint-{start}'} (step {start} of 60;" in again.stderr, again.stderr[-3000:]
    state = json.loads((out / "checkpoint-60" / "trainer_state.json").read_text())
    assert state["global_step"] == 60 and (out / "pt_lora_model" / "adapter_model.safetensors").is_file()
    assert "deleting" not in again.stderr

    # an explicit --resume is accepted too (the recipe no longer contradicts it); --check stops before training
    resume = _recipe("pt", env, *run, "--resume", "--check")
    assert resume.returncode == 0, resume.stderr[-3000:]
    assert f"resuming from {out / 'checkpoint-60'} (step 60 of 60; --resume)" in resume.stderr
    assert "check passed" in resume.stderr


def test_option_mistake_is_one_line_before_torchrun(tmp_path, merged_model_dir, merged_tok_dir, pt_data_dir):
    env = _env(merged_model_dir, merged_tok_dir, pt_data_dir, tmp_path / "pt")
    proc = _recipe("pt", env, "--lora_rnk", "4")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown option --lora_rnk for `train pt`; did you mean --lora_rank?"], proc.stderr


def test_error_inside_training_is_printed_last(tmp_path, merged_model_dir, merged_tok_dir):
    """A malformed record is found while tokenizing, inside the torchrun worker: torchrun then prints its
    ChildFailedError report; the recipe prints the one-line error again after it."""
    data = tmp_path / "sft_data"
    data.mkdir()
    (data / "bad.json").write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c"}\n]\n',
                                   encoding="utf-8")
    env = _env(merged_model_dir, merged_tok_dir, data, tmp_path / "sft")
    proc = _recipe("sft", env, "--max_seq_length", "64", "--no_do_eval", "--validation_split_percentage", "0")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "ChildFailedError" in proc.stderr  # the worker failed under torchrun ...
    want = f"error: {data / 'bad.json'}:3: record has no 'output'"
    assert lines[-1].startswith(want), lines[-5:]  # ... and its error is the last line, alone
    assert sum(ln.startswith(want) for ln in lines) == 2  # the worker's own line, and the recipe's

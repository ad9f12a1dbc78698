"""The same code under torchrun: 2 processes on CPU (gloo) train and write the same adapter format."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _adapter_shapes(d: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(d / "adapter_model.safetensors"), "pt") as fh:
        return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}


def test_torchrun_two_processes_gloo(tmp_path, base_model_dir, merged_tok_dir, pt_data_dir, merged_size):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    # `python -m torch.distributed.run` is the `torchrun` console script
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "cllama_deploy.training", "pt",
           "--model_name_or_path", str(base_model_dir), "--tokenizer_name_or_path", str(merged_tok_dir),
           "--dataset_dir", str(pt_data_dir), "--data_cache_dir", str(tmp_path / "cache"),
           "--output_dir", str(out), "--block_size", "32", "--per_device_train_batch_size", "2",
           "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1", "--lora_rank", "4",
           "--validation_split_percentage", "5", "--ddp_find_unused_parameters", "False",
           "--no_progress_bar"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    adapter = out / "pt_lora_model"
    shapes = _adapter_shapes(adapter)
    assert shapes["base_model.model.model.embed_tokens.weight"] == (merged_size, 64)
    assert shapes["base_model.model.lm_head.weight"] == (merged_size, 64)
    assert sum(".lora_A." in k for k in shapes) == 14
    assert (adapter / "adapter_config.json").is_file() and (adapter / "tokenizer.model").is_file()
    assert (out / "checkpoint-4").is_dir()
    # 2 processes × batch 2 × 32 tokens × 4 steps, counted across processes
    state = (out / "checkpoint-4" / "trainer_state.json").read_text()
    assert '"num_input_tokens_seen": 512' in state

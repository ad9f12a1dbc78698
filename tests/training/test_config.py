"""Flags, YAML config files and their precedence, validation messages, CLI exit codes."""

from __future__ import annotations

import pytest

from cllama_deploy.cli import main as cli_main
from cllama_deploy.errors import ConfigError
from cllama_deploy.training.config import PTConfig, SFTConfig, parse_args


@pytest.fixture()
def dirs(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "data").mkdir()
    return tmp_path


def base_args(d):
    return ["--model_name_or_path", str(d / "model"), "--dataset_dir", str(d / "data"),
            "--output_dir", str(d / "out")]


def test_seed_recipe_flags_parse(dirs):
    """The seed's pre-training launch flags, as they are."""
    argv = base_args(dirs) + (
        "--tokenizer_name_or_path {m} --data_cache_dir {c} --validation_split_percentage 0.001 "
        "--per_device_train_batch_size 1 --do_train --seed 7 --max_steps 100 --lr_scheduler_type cosine "
        "--learning_rate 2e-4 --warmup_ratio 0.05 --weight_decay 0.01 --logging_steps 10 --logging_strategy steps "
        "--save_strategy steps --save_steps 500 --save_total_limit 3 --gradient_accumulation_steps 1 "
        "--preprocessing_num_workers 8 --block_size 512 --lora_rank 8 --lora_alpha 32 "
        "--trainable q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj --modules_to_save embed_tokens,lm_head "
        "--lora_dropout 0.05 --torch_dtype float16 --gradient_checkpointing --ddp_find_unused_parameters False "
        "--overwrite_output_dir --logging_first_step True --ddp_timeout 30000"
    ).format(m=dirs / "model", c=dirs / "cache").split()
    cfg = parse_args("pt", argv)
    assert isinstance(cfg, PTConfig)
    assert cfg.block_size == 512 and cfg.lora_rank == 8 and cfg.lora_alpha == 32.0
    assert cfg.gradient_checkpointing is True and cfg.ddp_find_unused_parameters is False
    assert cfg.trainable_modules == ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
    assert cfg.modules_to_save_list == ["embed_tokens", "lm_head"]
    assert cfg.validation_split_percentage == 0.001 and cfg.torch_dtype == "float16"
    assert cfg.logging_first_step is True and cfg.overwrite_output_dir is True and cfg.seed == 7


def test_defaults_are_the_seeds(dirs):
    cfg = parse_args("pt", base_args(dirs))
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout) == (8, 32.0, 0.05)
    assert cfg.learning_rate == 2e-4 and cfg.lr_scheduler_type == "cosine" and cfg.warmup_ratio == 0.05
    assert cfg.weight_decay == 0.01 and cfg.block_size == 512
    assert cfg.modules_to_save_list == ["embed_tokens", "lm_head"]
    sft = parse_args("sft", base_args(dirs))
    assert isinstance(sft, SFTConfig) and sft.max_seq_length == 512 and sft.prompt_template == "alpaca"


def test_dashes_and_underscores(dirs):
    cfg = parse_args("pt", base_args(dirs) + ["--block-size", "64", "--lora_rank=4", "--no-progress-bar"])
    assert cfg.block_size == 64 and cfg.lora_rank == 4 and cfg.progress_bar is False


def test_repeatable_lora_and_bare_resume(dirs):
    a, b = dirs / "a", dirs / "b"
    a.mkdir(), b.mkdir()
    cfg = parse_args("sft", base_args(dirs) + ["--lora", str(a), "--lora", str(b), "--resume"])
    assert cfg.lora == [str(a), str(b)] and cfg.resume == "latest"


def test_yaml_config_and_flag_precedence(dirs):
    y = dirs / "c.yaml"
    y.write_text(f"model_name_or_path: {dirs / 'model'}\ndataset-dir: {dirs / 'data'}\noutput_dir: {dirs / 'out'}\n"
                 "block_size: 128\nlora_rank: 16\ntrainable: [q_proj, v_proj]\ngradient_checkpointing: true\n")
    cfg = parse_args("pt", ["--config", str(y), "--lora_rank", "4"])
    assert cfg.block_size == 128          # from the file
    assert cfg.lora_rank == 4             # the flag wins
    assert cfg.trainable_modules == ["q_proj", "v_proj"] and cfg.gradient_checkpointing is True


def test_yaml_unknown_key(dirs):
    y = dirs / "c.yaml"
    y.write_text("lora_rnk: 4\n")
    with pytest.raises(ConfigError, match="unknown option 'lora_rnk'.*lora_rank"):
        parse_args("pt", base_args(dirs) + ["--config", str(y)])


@pytest.mark.parametrize("argv, match", [
    (["--lora_rnk", "4"], r"unknown option --lora_rnk.*did you mean --lora_rank"),
    (["--load_in_kbits", "16"], r"--load_in_kbits is not supported"),
    (["--flash_attn"], r"--flash_attn is not supported"),
    (["--block_size", "1"], r"--block_size must be >= 2"),
    (["--block_size", "abc"], r"--block_size"),
    (["--validation_split_percentage", "150"], r"--validation_split_percentage must be in \[0, 100\)"),
    (["--lora_dropout", "1.5"], r"--lora_dropout"),
    (["--fp16", "--bf16"], r"--fp16 and --bf16"),
    (["--trainable", "none"], r"--trainable must name"),
    (["--ddp_find_unused_parameters", "maybe"], r"--ddp_find_unused_parameters takes true/false"),
    (["--max_steps", "0"], r"--max_steps must be > 0"),
])
def test_bad_flags_name_the_flag(dirs, argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_args("pt", base_args(dirs) + argv)


def test_required_flags(dirs):
    with pytest.raises(ConfigError, match="--model_name_or_path is required"):
        parse_args("pt", ["--dataset_dir", str(dirs / "data"), "--output_dir", str(dirs / "o")])
    with pytest.raises(ConfigError, match="--dataset_dir .*not a directory"):
        parse_args("pt", base_args(dirs)[:2] + ["--dataset_dir", str(dirs / "nope"), "--output_dir", "o"])


def test_sft_only_flags(dirs):
    with pytest.raises(ConfigError, match="--max_seq_length"):
        parse_args("pt", base_args(dirs) + ["--max_seq_length", "128"])
    cfg = parse_args("sft", base_args(dirs) + ["--max_seq_length", "128", "--prompt_template", "alpaca-2"])
    assert cfg.max_seq_length == 128 and cfg.prompt_template == "alpaca-2"


def test_cli_errors_exit_2(dirs, capsys):
    assert cli_main(["train", "pt"] + base_args(dirs) + ["--lora_rnk", "4"]) == 2
    err = capsys.readouterr().err
    assert "--lora_rank" in err and "Traceback" not in err
    assert cli_main(["train", "sft", "--model_name_or_path", str(dirs / "missing"), "--dataset_dir",
                     str(dirs / "data"), "--output_dir", str(dirs / "o")]) == 2


def test_cli_help_lists_seed_flags(capsys):
    assert cli_main(["train", "pt", "--help"]) == 0
    out = capsys.readouterr().out
    for name in ("--model_name_or_path", "--block_size", "--lora_rank", "--modules_to_save", "--auto_batch"):
        assert name in out


def test_module_entry_errors_exit_2(dirs, capsys):
    from cllama_deploy.training.__main__ import main

    assert main(["pt"] + base_args(dirs) + ["--nonsense"]) == 2
    assert main(["bogus"]) == 2


@pytest.mark.parametrize("stage, name", [("pt", "pt_example.yaml"), ("sft", "sft_example.yaml")])
def test_example_configs_are_valid(stage, name):
    from pathlib import Path

    from cllama_deploy.training.config import load_yaml_config

    values = load_yaml_config(Path(__file__).resolve().parents[2] / "training" / name, stage)
    assert values["lora_rank"] == 8 and "model_name_or_path" in values


def test_run_scripts_use_known_flags():
    """Every --flag in training/run_*.sh parses (the seed's recipes port by changing only the command)."""
    import re
    from pathlib import Path

    from cllama_deploy.training.config import build_parser

    root = Path(__file__).resolve().parents[2] / "training"
    launch = (root / "launch.sh").read_text()  # sourced by both: runs `--check`, then torchrun
    for stage in ("pt", "sft"):
        text = (root / f"run_{stage}.sh").read_text()
        assert 'source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"' in text and f"\nlaunch {stage} " in text
        known = {o for a in build_parser(stage)._actions for o in a.option_strings}
        options = text.split("\nargs=(\n", 1)[1].split("\n)\n", 1)[0]  # the options both commands get
        extras = re.findall(r"\+?=\((--[a-z0-9_]+)", text)  # --deepspeed, --lora, --validation_file
        check = re.findall(r'cllama_deploy\.training "\$stage" (--[a-z0-9_]+)', launch)
        flags = set(re.findall(r"(--[a-z0-9_]+)", options)) | set(extras) | set(check)
        assert len(flags) > 30 and "--check" in flags and flags <= known, flags - known
        for script in (text, launch):
            assert "--overwrite_output_dir" not in script.replace("append --overwrite_output_dir", "")

"""`cllama-deploy train pt|sft`: flags are parsed by cllama_deploy.training.config (the seed's names,
shared with `python -m cllama_deploy.training` under torchrun); this module only forwards them."""

from __future__ import annotations

import typer

app = typer.Typer(help="LoRA pre-training (pt) and instruction fine-tuning (sft).", no_args_is_help=True)

_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def _run(stage: str, ctx: typer.Context) -> None:
    from cllama_deploy.training.config import parse_args

    cfg = parse_args(stage, list(ctx.args))
    if cfg is None:  # --help was printed
        return
    from cllama_deploy.training.run import train

    train(cfg)


@app.command("pt", context_settings=_PASS_THROUGH, add_help_option=False)
def pt(ctx: typer.Context) -> None:
    """LoRA incremental pre-training on a directory of .txt files (`train pt --help` lists the flags)."""
    _run("pt", ctx)


@app.command("sft", context_settings=_PASS_THROUGH, add_help_option=False)
def sft(ctx: typer.Context) -> None:
    """LoRA instruction fine-tuning on Alpaca JSON/JSONL (`train sft --help` lists the flags)."""
    _run("sft", ctx)

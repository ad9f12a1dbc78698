"""`cllama-deploy eval ppl | quant | choice` and `cllama-deploy bench` (options from the configs in
:mod:`cllama_deploy.evaluation`); reports go to stdout, progress to stderr."""

from __future__ import annotations

import typer

from cllama_deploy.cli.from_config import config_command
from cllama_deploy.evaluation.bench import BenchConfig
from cllama_deploy.evaluation.choice import ChoiceConfig
from cllama_deploy.evaluation.perplexity import PplConfig
from cllama_deploy.evaluation.quant import QuantEvalConfig


def _out():
    from rich.console import Console

    return Console()


def register(app: typer.Typer) -> None:
    """Add the `eval` group and `bench` to the root app."""
    group = typer.Typer(help="Evaluate models: perplexity, a quantization report, C-Eval-style multiple choice.",
                        no_args_is_help=True)

    @config_command(group, "ppl", PplConfig)
    def ppl_cmd(config: PplConfig) -> None:
        """Perplexity of a GGUF or an HF model (with adapters), computed exactly like llama-perplexity."""
        from cllama_deploy.evaluation.perplexity import perplexity

        r = perplexity(config)
        _out().print(f"{r.model} ({r.backend}): {r.chunks} windows of {r.ctx} tokens, {r.tokens_scored} tokens "
                     f"scored, {r.tokens_per_second:.1f} prompt tokens/s\n"
                     f"Final estimate: PPL = {r.ppl:.4f} +/- {r.ppl_stderr:.5f}")

    @config_command(group, "quant", QuantEvalConfig)
    def quant_cmd(config: QuantEvalConfig) -> None:
        """Quantize to several types and compare each with the reference: size, PPL, KL divergence, speed."""
        from rich.table import Table

        from cllama_deploy.evaluation.quant import evaluate_quants, table_rows

        report = evaluate_quants(config)
        ref = report.reference
        table = Table(title=f"{report.input}: {report.chunks} windows of {report.ctx} tokens, "
                            f"{report.tokens_scored} tokens; reference {ref['model']} ({ref['backend']}) "
                            f"PPL {ref['ppl']:.4f} ± {ref['ppl_stderr']:.4f}")
        rows = table_rows(report)
        for col in rows[0]:
            table.add_column(col, justify="left" if col == "type" else "right")
        for r in rows:
            table.add_row(*r.values())
        out = _out()
        out.print(table)
        for note in report.notes:
            out.print(f"note: {note}")
        for kind, path in report.outputs.items():
            out.print(f"{kind}: {path}")

    @config_command(group, "choice", ChoiceConfig)
    def choice_cmd(config: ChoiceConfig) -> None:
        """C-Eval-style multiple choice (zero- or k-shot) scored from the logits of the option letters."""
        from rich.table import Table

        from cllama_deploy.evaluation.choice import evaluate_choice

        r = evaluate_choice(config)
        table = Table(title=f"{r.model} ({r.backend}), {r.split}, {r.shots}-shot, template {r.template}, "
                            f"score {r.score}")
        for col in ("subject", "name", "group", "questions", "accuracy %"):
            table.add_column(col, justify="right" if col in ("questions", "accuracy %") else "left")
        for s in r.subjects:
            table.add_row(s.subject, s.name, s.group, str(s.num), "-" if s.accuracy is None else f"{s.accuracy:.2f}")
        out = _out()
        out.print(table)
        if r.accuracy is not None:
            out.print(f"accuracy (weighted by subject size): {r.accuracy:.2f}% of {r.num}; mean over subjects "
                      f"{r.subject_mean:.2f}%")
        for kind, path in r.outputs.items():
            out.print(f"{kind}: {path}")

    app.add_typer(group, name="eval")

    @config_command(app, "bench", BenchConfig)
    def bench_cmd(config: BenchConfig) -> None:
        """Prompt and generation tokens/s (llama-bench's way), batched decoding, and the memory-bandwidth bound."""
        from rich.table import Table

        from cllama_deploy.evaluation.bench import bench
        from cllama_deploy.progress import console

        r = bench(config, on_step=(lambda s: console.print(f"[dim]{s}[/]")) if config.show_progress else None)
        table = Table(title=f"{r.model}: {r.size_bytes / 2**20:.1f} MiB, {r.weights.per_token / 2**20:.1f} MiB of "
                            f"weights read per token ({config.reps} repetitions)")
        for col in ("test", "threads", "t/s", "bandwidth bound t/s"):
            table.add_column(col, justify="left" if col == "test" else "right")
        for s in r.speeds:
            bound = f"{r.bound(s.threads):.2f}" if s.test.startswith("tg") else ""
            table.add_row(s.test, str(s.threads), f"{s.mean:.2f} ± {s.stdev:.2f}", bound)
        for b in r.batched:
            table.add_row(f"batched tg{config.n_gen} ×{b['batch']}", str(b["threads"]),
                          f"{b['tokens_per_second']:.2f} ± {b['stdev']:.2f}", "")
        out = _out()
        out.print(table)
        for t, bw in r.bandwidth.items():
            out.print(f"memory read bandwidth with {t} thread(s): {bw / 1e9:.2f} GB/s → single-stream decode bound "
                      f"{r.bound(t):.2f} tokens/s")
        for note in r.notes:
            out.print(f"note: {note}")
        if config.json_path is not None:
            out.print(f"json: {config.json_path}")

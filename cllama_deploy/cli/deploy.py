"""`cllama-deploy convert | quantize | inspect | deploy`: thin wrappers over the gguf stages and the
deploy pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""

    @app.command("convert")
    def convert_cmd(
        model_dir: Path = typer.Argument(..., help="Hugging Face LLaMA directory (config.json, weights, "
                                         "tokenizer.model)."),
        out: Path = typer.Option(..., "--out", "-o", help="GGUF file to write (atomically)."),
        outtype: str = typer.Option("f16", "--outtype", help="f32, f16, bf16 or q8_0."),
        chat_template: str = typer.Option("alpaca", "--chat-template",
                                          help="alpaca (seed prompt), alpaca-2, none, or a .jinja file."),
        name: Optional[str] = typer.Option(None, "--name", help="general.name (default: the directory name)."),
        tokenizer: Optional[Path] = typer.Option(None, "--tokenizer",
                                                 help="tokenizer.model to use instead of MODEL_DIR's."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    ) -> None:
        """Convert an HF LLaMA model to GGUF (our converter; llama.cpp-compatible output)."""
        from cllama_deploy.gguf.convert import ConvertConfig, convert
        from cllama_deploy.progress import console

        result = convert(ConvertConfig(model_dir=model_dir, out=out, outtype=outtype, chat_template=chat_template,
                                       name=name, tokenizer=tokenizer, show_progress=not quiet))
        o = result.outputs[0]
        types = ", ".join(f"{k}×{v}" for k, v in sorted(o.tensor_types.items()))
        console.print(f"wrote {o.path} ({_mib(o.size_bytes)}, {result.n_tensors} tensors: {types}; "
                      f"vocab {result.vocab_size}; {result.seconds:.1f}s)")

    @app.command("quantize")
    def quantize_cmd(
        input: Path = typer.Argument(..., metavar="IN", help="GGUF to quantize (f32/f16/bf16)."),
        output: Path = typer.Argument(..., metavar="OUT", help="GGUF to write (atomically)."),
        type: str = typer.Option("Q4_K_M", "--type", "-t", help="llama.cpp type: Q4_K_M, Q5_K_M, Q8_0, IQ4_XS, "
                                 "… (`--list-types` shows all)."),
        threads: Optional[int] = typer.Option(None, "--threads", help="Threads (default: $CLLAMA_N_THREADS or "
                                              "all cores)."),
        output_tensor_type: Optional[str] = typer.Option(None, "--output-tensor-type",
                                                         help="GGML type for output.weight, e.g. q8_0."),
        token_embedding_type: Optional[str] = typer.Option(None, "--token-embedding-type",
                                                           help="GGML type for token_embd.weight, e.g. q8_0."),
        pure: bool = typer.Option(False, "--pure", help="Every tensor gets the base type (no k-quant mixture)."),
        allow_requantize: bool = typer.Option(False, "--allow-requantize",
                                              help="Allow an already-quantized input (loses quality)."),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Show llama.cpp's log."),
        show_tensors: bool = typer.Option(False, "--tensors", help="Print every tensor's type."),
        list_types: bool = typer.Option(False, "--list-types", is_eager=True, callback=_list_types,
                                        help="List the available types and exit."),
    ) -> None:
        """Quantize a GGUF with llama.cpp; reports tensor types, fallbacks, size and bits per weight."""
        from rich.table import Table

        from cllama_deploy.gguf.quantize import QuantizeConfig, quantize
        from cllama_deploy.progress import console

        result = quantize(QuantizeConfig(input=input, output=output, type=type, threads=threads,
                                         output_tensor_type=output_tensor_type,
                                         token_embedding_type=token_embedding_type, pure=pure,
                                         allow_requantize=allow_requantize, verbose=verbose))
        counts = ", ".join(f"{k}×{v}" for k, v in sorted(result.type_counts().items()))
        console.print(f"wrote {result.path}: {result.type}, {_mib(result.size_bytes)} "
                      f"(from {_mib(result.input_size_bytes)}), {result.bits_per_weight:.2f} bits per weight, "
                      f"tensors {counts} ({result.seconds:.1f}s)")
        if result.fallbacks:
            console.print(f"{len(result.fallbacks)} tensor(s) fell back from {result.base_type} because their rows "
                          f"are not a multiple of its block size:")
            for t in result.fallbacks:
                console.print(f"  {t.name} [{'×'.join(map(str, t.shape))}] → {t.type}")
        if show_tensors:
            table = Table(title="tensors")
            for col in ("name", "shape", "type", "status"):
                table.add_column(col)
            for t in result.tensors:
                table.add_row(t.name, "×".join(map(str, t.shape)), t.type, t.status)
            console.print(table)

    @app.command("inspect")
    def inspect_cmd(
        model: Path = typer.Argument(..., help="GGUF file."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout instead of tables."),
        no_tensors: bool = typer.Option(False, "--no-tensors", help="Leave out the per-tensor table."),
    ) -> None:
        """Show a GGUF's metadata, tensors, vocabulary summary and chat template."""
        from rich.console import Console

        from cllama_deploy.gguf.inspect import inspect_gguf, render

        info = inspect_gguf(model)
        if as_json:
            d = info.to_dict()
            if no_tensors:
                d.pop("tensors")
            typer.echo(json.dumps(d, indent=2, ensure_ascii=False))
        else:
            render(info, Console(), show_tensors=not no_tensors)

    @app.command("deploy")
    def deploy_cmd(
        base: Path = typer.Option(..., "--base", help="Hugging Face base model directory."),
        lora: Optional[List[Path]] = typer.Option(None, "--lora", help="PEFT LoRA adapter directory; repeat to "
                                                  "merge several in order (PT LoRA first, then SFT LoRA)."),
        quant: Optional[List[str]] = typer.Option(None, "--quant", help="Output type; repeat for several: F32, "
                                                  "F16, BF16, Q8_0, Q4_K_M, Q5_K_M, … (default Q4_K_M)."),
        out: Path = typer.Option(..., "--out", help="Output directory (GGUFs, Modelfiles, manifest.json)."),
        name: Optional[str] = typer.Option(None, "--name", help="File name stem and general.name (default: the "
                                           "last adapter's directory name)."),
        keep_hf: bool = typer.Option(False, "--keep-hf", help="Also write the merged HF model to OUT/NAME-hf."),
        chat_template: str = typer.Option("alpaca", "--chat-template",
                                          help="alpaca, alpaca-2, none, or a .jinja file."),
        threads: Optional[int] = typer.Option(None, "--threads", help="Quantization threads."),
        force: bool = typer.Option(False, "--force", help="Redo every step, even those the manifest says are done."),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Show llama.cpp's log."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    ) -> None:
        """Merge LoRA adapters, convert and quantize to every requested type in one pass, with a manifest."""
        from cllama_deploy.pipeline import DeployConfig, deploy
        from cllama_deploy.progress import console

        result = deploy(DeployConfig(base=base, loras=list(lora or []), quants=list(quant or ["Q4_K_M"]), out=out,
                                     name=name, keep_hf=keep_hf, chat_template=chat_template, threads=threads,
                                     force=force, show_progress=not quiet, verbose=verbose))
        for s in result.steps:
            mem = f", peak RSS {_mib(s.peak_rss_bytes)}" if s.peak_rss_bytes else ""
            console.print(f"  {s.name}: {s.status} ({s.seconds:.1f}s{mem})")
        for o in result.outputs:
            extra = f", {o.bits_per_weight:.2f} bpw" if o.bits_per_weight else ""
            fb = f", {len(o.fallbacks)} tensor(s) fell back" if o.fallbacks else ""
            console.print(f"{o.type}: {o.path} ({_mib(o.size_bytes)}{extra}{fb}); Ollama: {o.modelfile.name}")
        console.print(f"manifest: {result.manifest} ({result.seconds:.1f}s)")


def _list_types(value: bool) -> None:
    if value:
        _print_types()
        raise typer.Exit()


def _print_types() -> None:
    from rich.console import Console
    from rich.table import Table

    from cllama_deploy.gguf.quantize import NEEDS_IMATRIX, QUANT_TYPES, available_types

    table = Table(title="quantization types (llama.cpp)")
    for col in ("type", "base tensor type", "notes"):
        table.add_column(col)
    for name, (_, base, desc) in QUANT_TYPES.items():
        note = desc + (" — not available: needs an importance matrix" if name in NEEDS_IMATRIX else
                       " — not available: the installed gguf package cannot read it"
                       if name not in available_types() else "")
        table.add_row(name, base, note)
    Console().print(table)

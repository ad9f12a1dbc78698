"""`cllama-deploy quantize`: llama.cpp quantization (options from
:class:`~cllama_deploy.gguf.quantize.QuantizeConfig`)."""

from __future__ import annotations

import typer

from cllama_deploy.cli.from_config import config_command
from cllama_deploy.cli.report import mib, type_counts
from cllama_deploy.gguf.quantize import QuantizeConfig


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""

    @config_command(app, "quantize", QuantizeConfig)
    def quantize_cmd(
        config: QuantizeConfig,
        show_tensors: bool = typer.Option(False, "--tensors", help="Print every tensor's type."),
        list_types: bool = typer.Option(False, "--list-types", is_eager=True, callback=_list_types,
                                        help="List the available types and exit."),
    ) -> None:
        """Quantize a GGUF with llama.cpp; reports tensor types, fallbacks, size and bits per weight."""
        from rich.table import Table

        from cllama_deploy.gguf.quantize import quantize
        from cllama_deploy.progress import console

        result = quantize(config)
        console.print(f"wrote {result.path}: {result.type}, {mib(result.size_bytes)} "
                      f"(from {mib(result.input_size_bytes)}), {result.bits_per_weight:.2f} bits per weight, "
                      f"tensors {type_counts(result.type_counts())} ({result.seconds:.1f}s)")
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

"""What every `homelab-disagg` command shares, the product's and the lab's alike: the consoles, the
common options and the one-line failure (`--debug` or HOMELAB_DISAGG_DEBUG=1 for the trace)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from homelab_disagg.config import Env
from wire import codecs

# Tables are wide (the TTFT anatomy has 13 columns): 140 columns when output is not a terminal.
console = Console(width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True)

# the registry's names, for options' help texts
CODEC_NAMES, CACHE_TYPE_NAMES = ", ".join(codecs.names()), ", ".join(codecs.CACHE_TYPES)

ModelOpt = Annotated[Optional[Path], typer.Option("--model", "-m", help="GGUF file (llama, qwen2 or qwen3 architecture). Default: the embedded SmolLM2-135M-Instruct Q4_1.")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="Lab TOML naming remote workers. Default: start workers on this machine.")]
CsvOpt = Annotated[Optional[Path], typer.Option("--csv", help="CSV output path. Default: results/bench-<name>-<time>.csv")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line.")]


class Debug:
    """Whether a known failure shows its trace: set once by the top-level `--debug` callback."""

    on = Env().debug


def fail(e: BaseException) -> None:
    if Debug.on:
        raise e
    err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def resolve_model_path(model: Optional[Path]) -> Path:
    from homelab_disagg.model import read_model_info, resolve_model

    path = resolve_model(model)
    read_model_info(path)  # refuses unsupported architectures before any process starts
    return path

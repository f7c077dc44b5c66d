"""``compress lora extract`` and ``compress lora merge`` (registered in the main group by cli/main.py)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import click

from compressor.cli.common import fail
from compressor.core.errors import CompressorError

_load_options = [
    click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder."),
    click.option("--force", is_flag=True, help="Replace the output folder if it exists."),
    click.option("--trust-pickle", is_flag=True,
                 help="Allow loading a pickled model whose file names code to run (only for files you trust)."),
    click.option("--arch", help="package.module:factory building the model for a bare state_dict."),
    click.option("--debug", is_flag=True, help="Show tracebacks."),
]


def _with(options):
    def apply(f):
        for opt in reversed(options):
            f = opt(f)
        return f
    return apply


@click.group("lora", no_args_is_help=False)
def lora() -> None:
    """LoRA adapters as PEFT writes them: extract one from two checkpoints, merge one into a model."""


@lora.command("extract")
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("tuned", type=click.Path(path_type=Path))
@click.option("--energy", type=float, help="Per layer, keep this fraction of the change's energy (0, 1].")
@click.option("--rank", type=int, help="The same adapter rank for every layer.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_with(_load_options)
def extract_cmd(base: Path, tuned: Path, energy: float | None, rank: int | None, as_json: bool, out: Path,
                force: bool, trust_pickle: bool, arch: str | None, debug: bool) -> None:
    """The adapter that turns BASE into TUNED: per layer, the truncated SVD of their difference, written
    to --out as PEFT does, with the per-layer reconstruction error in extract.md / extract.json."""
    from compressor.jobs.lora import extract_folder

    command = "compress " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        report = extract_folder(base, tuned, out, energy=energy, rank=rank, force=force, trust_pickle=trust_pickle,
                                arch=arch, command=command)
    except CompressorError as err:
        fail(err, debug)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    worst = max(report["layers"], key=lambda r: r["rel_error"])
    click.echo(f"{tuned} - {base} -> {out}/ ({len(report['layers'])} layers, adapter "
               f"{report['adapter_bytes']:,} bytes of {report['model_bytes']:,})\n"
               f"  largest relative error {worst['rel_error']:.2e} ({worst['layer']}, rank {worst['rank']})")
    if report["not_in_adapter"]:
        click.echo(f"warning: {len(report['not_in_adapter'])} other tensors changed (biases, norms) and are not "
                   "in the adapter; see extract.md", err=True)


@lora.command("merge")
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("adapter", type=click.Path(path_type=Path))
@_with(_load_options)
def merge_cmd(base: Path, adapter: Path, out: Path, force: bool, trust_pickle: bool, arch: str | None,
              debug: bool) -> None:
    """BASE with the adapter folder ADAPTER (compressor's or PEFT's) merged into its weights, saved to --out:
    a Hugging Face folder for a Hugging Face BASE, else a folder compressor loads."""
    from compressor.jobs.lora import merge_folder

    try:
        merge_folder(base, adapter, out, force=force, trust_pickle=trust_pickle, arch=arch)
    except CompressorError as err:
        fail(err, debug)
    click.echo(f"{base} + {adapter} -> {out}/")

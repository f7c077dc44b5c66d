"""``compress heal``: the command-line shell over :func:`compressor.jobs.heal.heal_folder`."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import click

from compressor.cli.common import command_line, fail
from compressor.cli.flags import common_options
from compressor.cli.train import heal_config_options
from compressor.core.errors import CompressorError


@click.command("heal")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), required=True,
              help="Training inputs (.pt/.npz/.safetensors; with 'inputs' and 'targets' for supervised "
                   "healing) or, for text models, a text file of one sentence per line (distillation).")
@click.option("--val", type=click.Path(path_type=Path), help="Held-out data in the same form, to pick the best.")
@click.option("--teacher", type=click.Path(path_type=Path),
              help="Original model for distillation [default: the one the compressed folder records].")
@click.option("--samples", type=int, help="Use at most this many samples of --data and --val.")
@click.option("--checkpoint-dir", type=click.Path(path_type=Path), help="Write resumable checkpoints here.")
@click.option("--resume", is_flag=True, help="Continue from the newest valid checkpoint in --checkpoint-dir.")
@click.option("--save-adapter", type=click.Path(path_type=Path),
              help="With --train lora: also write the trained adapters (before merging) to this folder as "
                   "PEFT does (adapter_config.json + adapter_model.safetensors).")
@heal_config_options
@common_options
def heal_cmd(model: Path, **kw: Any) -> None:
    """Fine-tune a compressed model's factors to win back what truncation lost."""
    from compressor.jobs.heal import heal_folder
    from compressor.train.heal import HealConfig, setting_names

    as_json, quiet, debug, out = kw.pop("as_json"), kw.pop("quiet"), kw.pop("debug"), kw.pop("out")
    kw.pop("arch")
    kw["progress"] = False if quiet or as_json else None
    command = command_line()
    try:
        config = HealConfig(**{name: kw.pop(name) for name in setting_names()})
        with warnings.catch_warnings():  # e.g. a damaged checkpoint skipped: one line, not a source listing
            warnings.showwarning = lambda message, *_, **__: click.echo(f"warning: {message}", err=True)
            summary = heal_folder(model, out, command=command, config=config, **kw)
    except CompressorError as err:
        fail(err, debug)
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2, default=str))
    elif not quiet:
        fmt = ", ".join
        filled = summary.recipe["filled"]
        if filled:  # which recipe the model's kind chose
            flags = fmt(f"--{k.replace('_', '-')} {v}" for k, v in filled.items())
            click.echo(f"{summary.recipe['kind']} defaults: {flags}")
        click.echo(f"{summary.source} -> {summary.output}/ ({summary.steps} steps, best step "
                   f"{summary.best_step})\n  before  {fmt(f'{k} {v:.4f}' for k, v in summary.before.items())}"
                   f"\n  after   {fmt(f'{k} {v:.4f}' for k, v in summary.after.items())}")
        if summary.note:
            click.echo(f"note: {summary.note}")

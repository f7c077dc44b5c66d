"""Command-line pieces for training runs (registered in the main ``compress`` group by cli.py)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path

import click

from compressor.cli.common import fail
from compressor.core.errors import CompressorError
from compressor.train.checkpoint import format_checkpoints, list_checkpoints, run_history
from compressor.train.heal import HealConfig, setting_types


class _ListByDefault(click.Group):
    """``compress checkpoints DIR`` lists (the ``list`` sub-command); ``compress checkpoints diff A B``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["list", *args]
        return super().parse_args(ctx, args)


@click.group("checkpoints", cls=_ListByDefault, no_args_is_help=False)
def checkpoints() -> None:
    """A training run's checkpoints: list them (compress checkpoints DIR [--plot PNG]), or compare two
    sets of weights (compress checkpoints diff A B)."""


@checkpoints.command("list")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON instead of a table.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="Also draw the monitored metric over the steps, best step marked, as this PNG file.")
def list_cmd(directory: Path, as_json: bool, plot: Path | None) -> None:
    """List the checkpoints in DIRECTORY: step, metrics, size, valid or why not, best marked.

    Exits with code 2 when a checkpoint is malformed or unsafe (resuming would refuse it); a damaged
    one (a crash's leftover, which resuming skips) is listed as INVALID and does not change the code.
    """
    try:
        rows = list_checkpoints(directory)
        if plot is not None:
            from compressor.report.plots import plot_metric_history

            if plot.suffix.lower() != ".png":
                raise CompressorError(f"--plot {plot} is not a .png file", "pass --plot NAME.png")
            run = run_history(directory)
            plot_metric_history(run["history"], run.get("monitor") or "train_loss", plot,
                                best_step=run.get("best_step"), mode=run.get("mode"))
    except CompressorError as err:
        fail(err)
    click.echo(json.dumps([asdict(r) for r in rows], indent=1) if as_json else format_checkpoints(rows))
    refused = [r for r in rows if r.refused]
    if refused:
        click.echo(f"error: checkpoint {refused[0].path} is {refused[0].reason} "
                   f"({len(refused)} refused in all); delete it (--resume would stop there)", err=True)
        sys.exit(2)


@checkpoints.command("diff")
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@click.option("--energy", type=float, default=0.9, show_default=True,
              help="The effective rank of a change holds this fraction of its squared singular values.")
@click.option("--top", type=int, default=5, show_default=True, help="Name this many layers that moved most.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@click.option("--trust-pickle", is_flag=True,
              help="Allow loading a pickled model whose file names code to run (only for files you trust).")
@click.option("--arch", help="package.module:factory building the model for a bare state_dict.")
def diff_cmd(a: Path, b: Path, energy: float, top: int, as_json: bool, trust_pickle: bool, arch: str | None) -> None:
    """How far B's weights moved from A's, per layer: ||B-A||/||A||, the effective rank of the change,
    the layers that moved most, and the metrics side by side when both are checkpoints. A and B are
    checkpoint folders (step-N), state_dict files, Hugging Face folders or model files."""
    from compressor.train.diff import diff_weights, format_diff, read_weights

    try:
        diff = diff_weights(read_weights(a, trust_pickle=trust_pickle, arch=arch),
                            read_weights(b, trust_pickle=trust_pickle, arch=arch), energy)
    except CompressorError as err:
        fail(err)
    click.echo(json.dumps(diff.to_dict(), indent=1) if as_json else format_diff(diff, top))


def heal_config_options(f: Callable) -> Callable:
    """One ``compress heal`` option per :class:`HealConfig` field: ``--kebab-case`` name, type, default,
    help, and choices from its ``Literal``. A new heal setting is a new field there, and nothing here."""
    types = setting_types()
    for setting in reversed(fields(HealConfig)):
        kind, choices, _ = types[setting.name]
        f = click.option("--" + setting.name.replace("_", "-"), setting.name,
                         type=click.Choice(choices) if choices else kind, default=setting.default,
                         show_default=setting.default is not None, help=setting.metadata["help"])(f)
    return f

"""``compress heal``: heal a compressed folder on a training file, as one Python call.

    result = heal_folder("model.compressed", data="train.pt")       # -> model.compressed.healed/
    result.before, result.after, result.best_step                     # heal.json is result.to_dict()
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from compressor.core.errors import CompressorError
from compressor.core.fileio import atomic_write_text, regular_file
from compressor.core.output import OutputDir, check_not_over_inputs
from compressor.jobs.loading import is_text
from compressor.jobs.results import HealFolderResult

if TYPE_CHECKING:
    from compressor.train.heal import HealConfig


def load_training_data(path: Path, tokenizer=None, samples: int | None = None, seq_len: int | None = None
                       ) -> tuple[Any, Any]:
    """``(inputs, targets)`` from a file: tensors (``.pt``/``.npz``/``.safetensors``) holding either the
    model's inputs alone (targets None: distillation) or ``inputs`` and ``targets`` (also ``x``/``y``);
    or, with a tokenizer, a text file of one sentence per line, or with ``seq_len`` too (a causal language
    model) the text as one token stream cut into ``samples`` sequences of ``seq_len`` tokens, each starting
    with the tokenizer's BOS if it adds one (no padding: every position is a next token to learn)."""
    from compressor.data.readers import load_example_inputs

    path = regular_file(path, "training data file")  # a FIFO would block the read forever
    if tokenizer is not None and is_text(path):
        from compressor.data.calibration import load_calibration

        if seq_len is None:
            return load_calibration(path, tokenizer=tokenizer, samples=samples), None
        batches = load_calibration(path, tokenizer=tokenizer, samples=samples, max_length=seq_len, stream=True,
                                   bos=True)
        # One set of sequences, so heal batches them by its --batch-size and shuffles sequences, not batches.
        return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}, None
    data = load_example_inputs(path)
    if isinstance(data, dict):
        for x, y in (("inputs", "targets"), ("x", "y")):
            if set(data) == {x, y}:
                return _cap(data[x], samples), _cap(data[y], samples)
    return _cap(data, samples), None


def _cap(x: Any, samples: int | None) -> Any:
    if samples is None:
        return x
    if isinstance(x, dict):
        return {k: v[:samples] for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(v[:samples] for v in x)
    return x[:samples]


def heal_folder(source: str | Path, out: str | Path | None = None, *, data: Path, val: Path | None = None,
                teacher: str | Path | None = None, trust_pickle: bool = False, force: bool = False,
                samples: int | None = None, command: str | None = None, config: HealConfig | None = None,
                checkpoint_dir: str | Path | None = None, resume: bool = False,
                progress: bool | None = None, save_adapter: str | Path | None = None) -> HealFolderResult:
    """Heal the compressed model at ``source`` on the data in files with the settings of ``config``, and
    save it to ``out``.

    Without targets in ``data`` this distils from ``teacher``: by default the original model recorded
    in the compressed folder. Returns a :class:`HealFolderResult` (before/after metrics, best step, where it
    went, and the config as JSON); its ``to_dict()`` is written to ``heal.json``. ``save_adapter`` (with
    ``config.train == "lora"``) also writes the trained adapters, before merging, to that folder as PEFT
    writes them; their base model is the compressed folder ``source``.
    """
    from compressor.formats.load import load_model
    from compressor.formats.save import save
    from compressor.report.card import write_model_card
    from compressor.report.report import versions
    from compressor.train.heal import HealConfig, heal

    source = Path(source)
    out = Path(out) if out is not None else source.parent / f"{source.name}.healed"
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise CompressorError(f"samples must be a whole number >= 1, got {samples!r}", "pass e.g. --samples 1000")
    if resume and checkpoint_dir is None:
        raise CompressorError("--resume needs the folder of the run to continue",
                              "pass --checkpoint-dir with --resume")
    if checkpoint_dir is not None:
        ck = Path(checkpoint_dir).resolve()
        for folder, what in ((source, "the compressed model's folder"), (out, "the output folder")):
            if ck == folder.resolve() or folder.resolve() in ck.parents:
                raise CompressorError(f"--checkpoint-dir {checkpoint_dir} is {what} or inside it",
                                      "pass --checkpoint-dir a folder of its own")
    inputs = [("model", source), ("training data", data), ("validation data", val), ("teacher", teacher),
              ("checkpoint folder", checkpoint_dir)]
    check_not_over_inputs(out, inputs)
    OutputDir(out, force).check()  # before the (slow) loading and training
    if save_adapter is not None:
        if config is None or config.train != "lora":
            raise CompressorError("only LoRA training has an adapter to save",
                                  "pass config.train='lora' with save_adapter", cli_fix="pass --train lora")
        check_not_over_inputs(save_adapter, [*inputs, ("output folder", out)])
        OutputDir(Path(save_adapter), force).check()
    loaded = load_model(source, trust_pickle=trust_pickle)
    if loaded.model is None:
        raise CompressorError(f"'{source}' holds only weights", "heal a folder written by compress")
    from compressor.train.decoder import is_causal_lm

    seq_len = (config or HealConfig()).seq_len if is_causal_lm(loaded.model) else None
    inputs, targets = load_training_data(data, loaded.tokenizer, samples, seq_len)
    val_data = None
    if val is not None:
        vx, vy = load_training_data(val, loaded.tokenizer, samples, seq_len)
        val_data = (vx, vy) if targets is not None else vx
    teacher_model = None
    # A causal LM learning its text's next tokens (--loss ce) needs no teacher.
    if targets is None and not (seq_len is not None and config is not None and config.loss == "ce"):
        recorded = loaded.meta.get("compressor", {}).get("source", {}).get("path")
        teacher_path = teacher or recorded
        if teacher_path is None or not Path(teacher_path).exists():
            raise CompressorError("distillation needs the original model, and none was given or recorded",
                                  "pass --teacher PATH, or --data with inputs and targets")
        check_not_over_inputs(out, [("teacher", teacher_path)])  # the one the folder records
        teacher_model = load_model(teacher_path, trust_pickle=trust_pickle).model
    with OutputDir(out, force) as tmp:
        result = heal(loaded.model, config, teacher=teacher_model, data=inputs, targets=targets,
                      val_data=val_data, checkpoint_dir=checkpoint_dir, resume=resume, progress=progress)
        plan = loaded.meta.get("plan")
        save(result.model, tmp, plan, source=loaded, atomic=False)
        summary = HealFolderResult(
            source=str(source), output=str(out), teacher=None if teacher_model is None else str(teacher or recorded),
            supervised=targets is not None, before=result.before, after=result.after, best_step=result.best_step,
            steps=result.steps, resumed_from=result.resumed_from, seconds=round(result.seconds, 2), note=result.note,
            blocks=[{k: v for k, v in b.items() if k != "history"} for b in result.blocks], history=result.history,
            config=result.config.to_dict(), recipe=result.recipe,
            checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir), command=command,
            versions=versions(), adapter=None if save_adapter is None else str(save_adapter))
        if save_adapter is not None:
            result.adapter.base_model_name_or_path = str(source.resolve())
        monitor, mode = result.config.monitor, result.config.mode
        if any(isinstance(h.get("metrics", {}).get(monitor), int | float) for h in result.history):
            from compressor.report.plots import plot_metric_history

            plot_metric_history(result.history, monitor, tmp / "metrics.png", result.best_step, mode)
            summary.plot = "metrics.png"  # the monitored metric over steps, the best step marked
        atomic_write_text(tmp / "heal.json", json.dumps(summary.to_dict(), indent=2, default=str) + "\n")
        write_model_card(tmp, json.loads(json.dumps(summary.to_dict(), default=str)))
        if save_adapter is not None:  # inside: a failure here publishes neither folder
            with OutputDir(Path(save_adapter), force) as adapter_tmp:
                result.adapter.write_into(adapter_tmp)
    return summary


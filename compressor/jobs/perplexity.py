"""Perplexity in jobs: ``compress eval`` on one model (a Hugging Face folder, a compressed folder, or an ONNX
file) as one Python call a notebook can make, and ``--eval-text`` in compress and search (one protocol for
the dense model, the compressed one and every written ONNX file):

    result = evaluate_perplexity("gemma/", "eval.txt", max_windows=8)    # a Perplexity
    result.ppl, result.to_dict()
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from compressor.core.errors import CompressorError
from compressor.core.progress import Progress
from compressor.core.threads import thread_budget
from compressor.data.perplexity import DEFAULT_WINDOW, Perplexity, default_window, perplexity, read_corpus, read_text
from compressor.formats.onnx_graph import is_onnx

if TYPE_CHECKING:
    from torch import nn

    from compressor.jobs.options import Options


def evaluate_perplexity(source: str | Path, text: str | Path, *, window: int | None = None,
                        stride: int | None = None, bos: bool = True, max_windows: int | None = None,
                        tokenizer: str | Path | None = None, threads: int | None = None,
                        trust_pickle: bool = False) -> Perplexity:
    """The perplexity of the causal language model at ``source`` on the text file ``text`` by the
    protocol of :mod:`compressor.data.perplexity` (``window`` defaults to 2048 capped at the model's
    context; ``stride`` to non-overlapping windows; ``bos``: each window begins with the BOS token).

    An ONNX file is run in onnxruntime; its tokenizer and config come from the folder ``tokenizer``, by
    default the file's own folder (a compressed folder holds both). ``threads``: torch's and
    onnxruntime's threads (None: their defaults)."""
    from compressor.formats.load import hf_config, hf_tokenizer, load_model

    source = Path(source)
    read_text(text)  # a bad text file is told before a model loads
    with thread_budget(threads):
        if is_onnx(source):
            from compressor.export.perplexity import onnx_perplexity

            folder = Path(tokenizer) if tokenizer is not None else source.parent
            tok = hf_tokenizer(folder)
            if tok is None:
                raise CompressorError(f"perplexity of an ONNX file needs its tokenizer, and '{folder}' has none",
                                      "pass tokenizer= a Hugging Face folder holding tokenizer.json",
                                      cli_fix="pass --tokenizer DIR, a Hugging Face folder holding tokenizer.json")
            if window is None:
                config = hf_config(folder) if (folder / "config.json").is_file() else {}
                window = default_window(types.SimpleNamespace(**config)) if config else DEFAULT_WINDOW
            return onnx_perplexity(source, read_corpus(text, tok), window=window, stride=stride, bos=bos,
                                   max_windows=max_windows, threads=threads)
        loaded = load_model(source, trust_pickle=trust_pickle)
        if loaded.model is None:
            raise CompressorError(f"'{source}' holds weights only, not a model to run",
                                  "pass a Hugging Face model folder or a folder written by compress")
        tok = hf_tokenizer(Path(tokenizer)) if tokenizer is not None else loaded.tokenizer
        return perplexity(loaded.model, read_corpus(text, tok), window=window, stride=stride, bos=bos,
                          max_windows=max_windows)


def eval_protocol(loaded, opts: Options):
    """The evaluation text tokenized once and its windows (a :class:`compressor.data.perplexity.Protocol`;
    the window defaults to the model's), refused before the slow steps when the model cannot be measured
    (shared by compress and search)."""
    from compressor.data.perplexity import Protocol, check_protocol, default_window, output_head, read_corpus

    output_head(loaded.model)  # a causal language model, or one line saying it is not
    window = opts.eval_window or default_window(getattr(loaded.model, "config", None))
    check_protocol(window, opts.eval_stride, opts.eval_bos, opts.eval_max_windows, flags="eval-")
    return Protocol(read_corpus(opts.eval_text, loaded.tokenizer), window, opts.eval_stride, opts.eval_bos,
                    opts.eval_max_windows)


def measure_perplexity(protocol, original: nn.Module, compressed: nn.Module, folder: Path,
                       variants: Sequence[str] = (), threads: int | None = None, progress: bool | None = None):
    """The perplexity of the dense model, the compressed one (when it differs), ``folder``'s model.onnx and
    its ``variants`` by one protocol (:class:`compressor.report.report.PerplexityReport`); one line per model
    measured with ``progress`` (None: on a terminal): each takes a minute or more on a decoder."""
    from compressor.export.perplexity import onnx_perplexity
    from compressor.report.report import PerplexityReport

    corpus, settings = protocol.corpus, protocol.settings()
    files = [p for p in (folder / "model.onnx", *(folder / f"model.{v}.onnx" for v in variants)) if p.is_file()]
    models: list[tuple[str, Callable[[], Perplexity]]] = [("dense", lambda: perplexity(original, corpus, **settings))]
    if compressed is not original:
        models.append(("compressed", lambda: perplexity(compressed, corpus, **settings)))
    models += [(p.name, lambda p=p: onnx_perplexity(p, corpus, **settings, threads=threads)) for p in files]
    show = Progress("perplexity", len(models), progress)
    results = {}
    for name, measure in models:
        results[name] = measure()
        show.step(f"{name} {results[name].ppl:.3f} ({len(results)}/{len(models)})")
    return PerplexityReport(results)

"""The click options the commands share, in groups (policy, export, eval, stream, ...): each maps one to one
onto a field of :class:`compressor.jobs.options.Options`, whose defaults they show."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from compressor.analysis.int4 import INT4_ROUNDINGS
from compressor.export.onnx import FACTOR_STORAGE, VARIANTS
from compressor.jobs.options import Options


def options_group(opts: list[Callable]) -> Callable[[Callable], Callable]:
    """One decorator applying a list of click options, in the order listed in --help."""
    def apply(f: Callable) -> Callable:
        for opt in reversed(opts):
            f = opt(f)
        return f
    return apply


outputs_option = click.option(
    "--output", "outputs", multiple=True,
    help="A model output that fidelity and sensitivity compare, e.g. last_hidden_state, or a pooled "
         "sentence_embedding:mean[:normalize] (also :cls, :max) (repeatable) [default: a sentence-transformers "
         "folder's pooled embedding, else every floating-point output].")


policy_options = options_group([
    click.option("--energy", type=float, help="Per layer, keep this fraction of spectral energy (0, 1]."),
    click.option("--rank", type=int, help="The same rank for every layer."),
    click.option("--rank-ratio", type=float, help="This fraction of each layer's full rank."),
    click.option("--target", type=float,
                 help="Remove this fraction of the factorizable parameters, allocated across layers."),
    click.option("--rank-multiple", type=int, default=Options.rank_multiple, show_default=True,
                 help="Round ranks up to a multiple of this (hardware friendliness)."),
    click.option("--include", multiple=True, help="Only layers matching this glob (repeatable)."),
    click.option("--exclude", multiple=True, help="Never layers matching this glob (repeatable)."),
    click.option("--calibration", type=click.Path(path_type=Path),
                 help="Calibration inputs for data-aware factors: tensors (.pt/.npz/.safetensors) or, "
                      "for Hugging Face text models, a text file with one sentence per line."),
    click.option("--calibration-samples", type=int, help="Use at most this many calibration samples."),
    click.option("--keep-batchnorm", is_flag=True,
                 help="Do not fold BatchNorms into the convs before them [default: fold, exact in eval mode]."),
    click.option("--pivoted", is_flag=True,
                 help="Store factored linear layers in the pivoted form: r(m+n-r) weights at rank r instead of "
                      "r(m+n), so a size budget keeps more rank (its outputs are put in place by two index copies)."),
    outputs_option,
])


common_options = options_group([
    click.option("--out", type=click.Path(path_type=Path),
                 help="Output folder [default: <model stem>.compressed/ beside the input]."),
    click.option("--force", is_flag=True, help="Replace the output folder if it exists."),
    click.option("--trust-pickle", is_flag=True,
                 help="Allow loading a pickled model whose file names code to run (only for files you trust)."),
    click.option("--arch", help="package.module:factory building the model for a bare state_dict."),
    click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout."),
    click.option("--quiet", is_flag=True, help="Print nothing but errors and warnings (and --json)."),
    click.option("--debug", is_flag=True, help="Show tracebacks."),
])


threads_option = click.option(
    "--threads", type=int,
    help="torch (and onnxruntime) threads for every step [default: the tool chooses per operation: SVDs on "
         "one thread, which stays fast on a busy machine].")


latency_option = click.option(
    "--latency-aware/--no-latency-aware", default=None,
    help="Factor only the layers measured faster than dense in onnxruntime at the example input shape "
         "(break-even ranks cached per machine), and time every file against dense in the report; a model.onnx "
         "slower than dense is refused (a search falls back to a file that is not slower). "
         "[default: on in search, off otherwise]")


EDGE_HELP = ("Also write edge/: every ONNX file as an onnxruntime .ort file (validated), the operators a reduced "
              "build needs (required_operators.config) and manifest.json (sizes, sha256, versions, batch-1 "
              "latency, fidelity); see docs/edge.md.")


export_options = options_group([
    click.option("--input-shape", "input_shapes", multiple=True,
                 help="Shape of an example input for export, e.g. 1x3x224x224 (repeatable)."),
    click.option("--example-inputs", type=click.Path(path_type=Path),
                 help="Example inputs for export (.pt/.npz/.safetensors)."),
    click.option("--atol", type=float, default=Options.atol, show_default=True,
                 help="Largest absolute difference allowed between onnxruntime and torch outputs."),
    click.option("--opset", type=int, default=Options.opset, show_default=True),
    # One flag per export variant (export.onnx.VARIANTS): --fp16, --int8, ... gathered into `variants`.
    *(click.option(f"--{v.name}", f"variant_{v.name}", is_flag=True,
                   help=f"Also write and validate model.{v.name}.onnx ({v.help}).")
      for v in VARIANTS.values() if v.write is not None),
    click.option("--int4-block-size", type=int, default=Options.int4_block_size, show_default=True,
                 help="With --int4: weights per scale and zero point (a power of two >= 16; smaller: more "
                      "faithful, bigger)."),
    click.option("--int4-correction",
                 help="With --int4: add a low-rank correction of each Linear's 4-bit rounding error: rank=R "
                      "(every layer), energy=E (of the error's spectrum) or budget=F (correction weights worth F "
                      "of the Linear weights, spent where they help most); whitened by --calibration if given."),
    click.option("--int4-factors", type=click.Choice(FACTOR_STORAGE), default=Options.int4_factors,
                 show_default=True, help="With --int4-correction: how its factors are stored."),
    click.option("--int4-rounding", type=click.Choice(INT4_ROUNDINGS), default=Options.int4_rounding,
                 show_default=True,
                 help="With --int4 and --calibration: gptq rounds each Linear's weights to the 4-bit grid so that its "
                      "output on the calibration inputs moves least (GPTQ); nearest rounds each weight alone. "
                      "Without --calibration weights are rounded to nearest."),
    click.option("--kv-cache", is_flag=True,
                 help="Causal LMs: also write model_kv.onnx (past_key_values.N.key/value in, present.N.key/value "
                      "out, as Optimum and onnxruntime-genai lay them out) and a model_kv.VARIANT.onnx per variant, "
                      "checked by greedy generation against the torch model on 10 prompts (the first lines of "
                      "--eval-text or a text --calibration, else built-in ones)."),
    click.option("--plots", is_flag=True, help="Add spectrum and energy plots to the output folder."),
    click.option("--edge", is_flag=True, help=EDGE_HELP),
])


held_out_option = click.option(
    "--eval-inputs", type=click.Path(path_type=Path),
    help="Held-out inputs to measure fidelity on instead of the two example inputs: tensors or, for Hugging Face "
         "text models, a text file with one sentence per line (not the calibration sentences).")


eval_options = options_group([
    click.option("--eval-text", type=click.Path(path_type=Path),
                 help="A UTF-8 text file: put the perplexity of the dense model, the compressed model and every "
                      "written ONNX file on it in the report (causal language models; see compress eval)."),
    click.option("--eval-window", type=int,
                 help="With --eval-text: model positions per window [default: 2048, capped at the model's context]."),
    click.option("--eval-stride", type=int,
                 help="With --eval-text: text tokens between window starts [default: a window's, no overlap]."),
    click.option("--eval-max-windows", type=int, help="With --eval-text: only the first N windows."),
    click.option("--eval-bos/--no-eval-bos", default=Options.eval_bos, show_default=True,
                 help="With --eval-text: begin each window with the BOS token."),
])


stream_options = options_group([
    click.option("--stream", is_flag=True,
                 help="Read a safetensors checkpoint (file or sharded Hugging Face folder) tensor by tensor and "
                      "write factored shards, never holding the model; resumable (rerun the same command)."),
    click.option("--svd", type=click.Choice(["exact", "randomized"]), default=Options.svd, show_default=True,
                 help="With --stream: 'randomized' finds only the leading singular triplets (--rank, --rank-ratio, "
                      "--energy, --target with --max-rank), checked per layer by an a-posteriori bound, exact SVD "
                      "where it fails."),
    click.option("--max-rank", type=int, default=Options.max_rank,
                 help="With --stream: no layer gets a rank above N (or stays dense); the randomized SVD then finds "
                      "only N triplets per layer. Needed by --target with --svd randomized."),
    click.option("--workers", type=int, default=Options.workers, show_default=True,
                 help="With --stream: worker processes for the per-layer SVDs (1: in this process)."),
    click.option("--ray", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
                 help="With --stream: run the per-layer work as Ray tasks, on a Ray started here (no ADDRESS) or "
                      "on the cluster at ADDRESS (every node must see the model files at the same path)."),
    click.option("--device", default=Options.device, show_default=True,
                 help="With --stream: where the SVDs run, e.g. cuda (results are byte-identical on one kind only)."),
    click.option("--restart", is_flag=True,
                 help="With --stream: start over, dropping an unfinished run's state instead of continuing it."),
])


keep_fp16_option = click.option(
    "--keep-fp16", type=int, default=0, show_default=True,
    help="With --int8: keep the N layers whose int8 rounding moves the output most (measured on "
         "--calibration) in fp16, about one byte more per kept weight.")


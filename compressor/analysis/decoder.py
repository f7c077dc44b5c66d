"""Calibrated analysis of a decoder (a causal language model: a list of transformer blocks), one block at
a time, in memory.

    cal = decoder_analysis(model, modules, batches, TargetPolicy(0.2), 1, {})   # what analyze() calls

The general calibrated path (:func:`compressor.analysis.calibration.calibrated_analysis`) hooks every layer of
the whole model at once, compares the model's outputs to measure sensitivities and refits layers on inputs
replayed through the whole compressed prefix. On a decoder its outputs are logits over the vocabulary (1 MB
per calibration token for Gemma 3's 262,144 tokens in float32) and each probe is a whole forward pass: Gemma
3 270M ran for over an hour at 17 GB. Here nothing past the last block ever runs, and only one block's
activations are held at a time:

1. **Spectra.** Every calibration batch runs up to block ``i`` (blocks before it replaced by stubs that
   return their recorded outputs, so block ``i`` receives exactly the arguments the model passes it:
   masks, position embeddings, per-layer sliding windows); hooks collect each layer's ``X^T X``; the
   whitened decompositions give each layer's output-error curve (SVD-LLM). With a ``TargetPolicy`` the ranks
   are then allocated across all layers at once (:func:`compressor.core.policies.allocate`).
2. **Sequential refit** (``sequential``). Block by block, in the order the block calls its layers (``q/k/v``,
   then ``o``, then ``gate/up``, then ``down``), each group of layers is refit on the inputs ``X^`` that the
   already-compressed blocks and layers before it produce, against the original layer's output on the
   original inputs ``X``: the rank-r ``W'`` minimising ``||W X - W' X^||`` (see
   :func:`compressor.analysis.whitened.whitened_decomposition`). Later layers thereby absorb part of the
   error of the earlier ones, across blocks as well as within one. The original and the compressed block
   outputs are both carried to the next block (two copies of ``tokens x hidden``).

Per block that is one pass of the original block (its layers' inputs kept, ``tokens x`` the sum of the
distinct input widths), one partial pass per layer group, and one pass of the compressed block. Peak memory
is the model, those inputs, the two carried hidden states and one layer's moments: it does not grow with
the vocabulary or the number of blocks.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, suppress
from typing import Any

import torch
from torch import nn

from compressor.analysis.blocks import block_list
from compressor.analysis.calibration import Calibrated, calibration_info, layer_handlers
from compressor.analysis.whitened import (
    DAMPING,
    Moments,
    accumulate,
    decompose,
    output_error,
    whitened_decomposition,
)
from compressor.core.errors import CompressorError
from compressor.core.handlers import handler_for
from compressor.core.hooks import (
    StopForward,
    captured_inputs,
    captured_outputs,
    patched_forward,
    stop_after,
    stop_before,
)
from compressor.core.memory import release_freed_memory
from compressor.core.policies import LayerSpectrum, Policy, across_layers, allocate
from compressor.core.progress import Progress
from compressor.core.rewrite import factor_module
from compressor.core.svd import Decomposition
from compressor.data.inputs import Batch, attention_mask, call, compared_outputs, map_tensors, take, tensors_of
from compressor.data.perplexity import head_chunk, token_nll

# Calibration sequences the output-side Fisher is estimated on (a forward and backward pass each).
FISHER_SEQUENCES = 64
# Sequences per backward pass: the activations of every block are kept for it. At 8 (1,024 tokens) they took
# Gemma 3 270M's analysis to 3.4 GB, its peak once the rest was trimmed; the sum is the same at any size.
FISHER_MICRO_BATCH = 4
# Layer-error weightings: "fisher" (output-side Fisher, diagonal), "kfac" (the output gradients' full second
# moment per layer, KFAC's output factor: out x out per layer, kept for the whole analysis) or None (every
# layer's relative error alike).
FISHER = "fisher"
KFAC = "kfac"
WEIGHTINGS = (FISHER, KFAC, None)
# Added to each layer's Fisher diagonal, relative to its mean: an output unit no calibration gradient reached
# still costs something.
FISHER_FLOOR = 1e-2
# What plan.calibration["passes"] says of a decoder calibrated block by block (in memory or streamed).
BLOCKWISE_PASSES = "block by block (decoder)"


def is_decoder(model: nn.Module) -> bool:
    """A causal language model built as a list of transformer blocks (a Hugging Face ``*ForCausalLM``):
    the models :func:`decoder_analysis` calibrates block by block."""
    can_generate = getattr(model, "can_generate", None)
    config = getattr(model, "config", None)
    return (callable(can_generate) and bool(can_generate()) and config is not None
            and not getattr(config, "is_encoder_decoder", False) and block_list(model) is not None)


class BlockPasses:
    """Calibration passes that stop after one block of ``model``'s block list, the blocks before it replaced
    by stubs returning ``carried`` outputs (one per batch)."""

    def __init__(self, model: nn.Module, batches: list[Batch]) -> None:
        name = block_list(model)
        if name is None:
            raise CompressorError(f"no list of transformer blocks was found in {type(model).__name__}",
                                  "calibrate it without block-wise passes")
        self.model, self.batches, self.name = model, batches, name
        self.blocks: nn.ModuleList = model.get_submodule(name)

    def run(self, i: int, carried: list[Any] | None, block: nn.Module | None = None,
            pre: Callable[[str, int, torch.Tensor, torch.Tensor | None], None] | None = None,
            hooked: dict[str, nn.Module] | None = None, stop: nn.Module | None = None) -> list[Any]:
        """Run every batch up to block ``i`` (``block`` in its place when given) and return the block's
        outputs per batch; ``i`` = the number of blocks: past every block (all stubs), returning nothing.
        ``pre(name, batch, x, mask)`` sees each call of the ``hooked`` modules; a call of ``stop`` ends the
        batch's pass before ``stop`` runs (nothing is returned then)."""
        outputs: list[Any] = []
        inside = i < len(self.blocks)
        state: dict[str, Any] = {}

        def keep(_i, _a, out):
            outputs.append(map_tensors(out, lambda t: t.detach()))

        def stub(_block, *_a, **_k):  # the blocks before ``i`` return what they returned before
            return map_tensors(carried[state["batch"]], lambda t: t.clone())

        original = self.blocks[i] if inside else None
        if block is not None:
            self.blocks[i] = block
        try:
            with ExitStack() as hooks:
                if inside:  # the pass ends after the block it is for
                    hooks.enter_context(captured_outputs({i: self.blocks[i]}, keep))
                    hooks.enter_context(stop_after(self.blocks[i]))
                hooks.enter_context(captured_inputs(
                    hooked or {}, lambda n, args: pre(n, state["batch"], args[0], state["mask"])))
                if stop is not None:
                    hooks.enter_context(stop_before(stop))
                hooks.enter_context(patched_forward([self.blocks[j] for j in range(i)], stub))
                with torch.no_grad():
                    for b, batch in enumerate(self.batches):
                        state["batch"], state["mask"] = b, attention_mask(batch)
                        with suppress(StopForward):
                            call(self.model, batch)
        finally:
            if inside:
                self.blocks[i] = original
        return outputs


def output_fisher(model: nn.Module, modules: dict[str, nn.Module], batches: list[Batch],
                  sequences: int = FISHER_SEQUENCES, chunk: int | None = None, full: bool = False
                  ) -> dict[str, torch.Tensor]:
    """The diagonal output-side Fisher of each layer in ``modules``: over the first ``sequences`` calibration
    sequences, the sum over tokens of ``(dL/dy)**2`` per output unit ``y`` of the layer, ``L`` the language
    model's summed next-token negative log-likelihood (padding left out). It says how much an error in each
    output unit costs the model's loss (KFAC-SVD's output-side factor, kept diagonal). ``full``: the whole
    second moment ``sum g g^T`` of the output gradients (``out x out`` per layer, float32), KFAC's factor.

    The head runs on chunks of ``chunk`` token positions (default: as many as
    :func:`compressor.data.perplexity.head_chunk` allows the vocabulary), each chunk's loss back-propagated
    to the final hidden state before the next chunk's logits exist: the logits over the vocabulary are never
    held for a whole batch. No parameter gradient is kept (parameters are frozen for the pass; the graph
    starts at the embeddings' output)."""
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    if head is None or embed is None:
        raise CompressorError(f"{type(model).__name__} has no output head or input embeddings to weight layer "
                              "errors by", "calibrate it without output weighting")
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    chunk = chunk if chunk is not None else head_chunk(_out_features(head))
    fisher = {n: torch.zeros((_out_features(m),) * (2 if full else 1), dtype=torch.float32 if full else torch.float64)
              for n, m in modules.items()}
    add = _add_outer if full else _add_squares
    frozen = {p: p.requires_grad for p in model.parameters()}
    state: dict[str, Any] = {}

    def grad_hook(n: str, _a, out):
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(lambda g: add(fisher[n], g))

    def leaf(_k, _a, out):  # the graph starts here: frozen parameters keep no gradient
        return out.detach().requires_grad_(True)

    def capture(_k, args):
        if "hidden" not in state:  # the model's own call of the head; the chunks below run it too
            state["hidden"] = args[0]
            raise StopForward

    try:
        for p in frozen:
            p.requires_grad_(False)
        with captured_outputs(modules, grad_hook), captured_outputs({"embed": embed}, leaf), \
                captured_inputs({"head": head}, capture):
            for batch in _micro_batches(batches, sequences, FISHER_MICRO_BATCH):
                with torch.enable_grad():
                    with suppress(StopForward):
                        call(model, batch)
                    _chunked_nll_backward(head, state["hidden"], batch, cap, chunk)
                    del state["hidden"]
    finally:
        for p, g in frozen.items():
            p.requires_grad_(g)
    return {n: f.float() for n, f in fisher.items()}


def _add_outer(total: torch.Tensor, g: torch.Tensor) -> None:
    """A gradient hook: adds ``g^T g`` over ``g``'s rows (tokens); returns None, so ``g`` flows on unchanged."""
    rows = g.detach().reshape(-1, g.shape[-1]).to(total.dtype)
    total.addmm_(rows.T, rows)


def _micro_batches(batches: list[Batch], sequences: int, size: int) -> Iterator[dict[str, torch.Tensor]]:
    """The first ``sequences`` sequences of ``batches`` (dicts of ``batch x tokens`` tensors), ``size`` at a
    time: a backward pass keeps every block's activations, so its memory grows with the sequences at once."""
    left = sequences
    for batch in batches:
        batch = dict(batch) if isinstance(batch, Mapping) else {"input_ids": tensors_of(batch)[0]}
        rows = batch["input_ids"].shape[0]
        for s in range(0, min(rows, left), size):
            e = min(s + size, rows, left)
            yield {k: v[s:e] for k, v in batch.items()}
        left -= min(rows, left)
        if left <= 0:
            return


def _add_squares(total: torch.Tensor, g: torch.Tensor) -> None:
    """A gradient hook: adds ``g``'s squares per unit (last axis); returns None, so ``g`` flows on unchanged."""
    total.add_(g.detach().double().square().reshape(-1, g.shape[-1]).sum(0))


def _chunked_nll_backward(head: nn.Module, hidden: torch.Tensor, batch: dict[str, torch.Tensor],
                          cap: float | None, chunk: int) -> None:
    """Back-propagate the summed next-token NLL of ``batch`` from the final hidden state, the head applied to
    ``chunk`` token positions (of all sequences together) at a time."""
    ids, mask = batch["input_ids"], attention_mask(batch)
    detached = hidden.detach().requires_grad_(True)
    rows = detached[:, :-1].reshape(-1, detached.shape[-1])  # position t predicts token t + 1
    target = ids[:, 1:].reshape(-1)
    if mask is not None:  # padding is neither predicted nor predicts
        keep = (mask[:, 1:] * mask[:, :-1]).reshape(-1).bool()
        rows, target = rows[keep], target[keep]
    for s in range(0, rows.shape[0], chunk):
        # the graph of ``rows`` (a view of ``detached``) is shared by the chunks
        token_nll(head(rows[s:s + chunk]), target[s:s + chunk], cap).sum().backward(retain_graph=True)
    hidden.backward(detached.grad)


def _out_features(module: nn.Module) -> int:
    return handler_for(module).weight_matrix(module).shape[0]


def decoder_analysis(model: nn.Module, modules: dict[str, nn.Module], batches: list[Batch], policy: Policy,
                     rank_multiple: int, fixed: dict[str, int | None], *, sequential: bool = True,
                     damping: tuple[float, ...] = DAMPING, weighting: str | None = FISHER,
                     progress: bool | None = None, outputs: Sequence[str] | None = None,
                     variants: dict[str, str] | None = None) -> Calibrated:
    """Whitened decompositions and ranks of ``modules`` (the factorizable layers of a decoder, by name),
    block by block. Layers outside the blocks (embeddings, an untied output head) are fit on the original
    model's statistics (not refit).

    ``weighting`` ``"fisher"``: each layer's output error is weighted per output unit by its diagonal
    output-side Fisher (:func:`output_fisher`), in the factors and in the allocation, which then compares
    layers by what their errors cost the model's loss rather than by each layer's relative error;
    ``"kfac"``: by the full second moment of its output gradients (correlated output directions together);
    None: every layer's relative output error counts the same (SVD-LLM). ``variants`` (``{layer: kind}``, or
    None): the layers stored in another form of the same factors (the pivoted one)."""
    if outputs:  # named outputs must exist (on one sample: a decoder's logits are large); the loss weighs layers
        with torch.no_grad():
            compared_outputs(call(model, take(batches[0], slice(0, 1))), outputs)
    if weighting not in WEIGHTINGS:
        raise CompressorError(f"unknown weighting {weighting!r}", f"use one of {', '.join(map(str, WEIGHTINGS))}")
    passes = BlockPasses(model, batches)
    blocks = len(passes.blocks)
    per_block: list[dict[str, nn.Module]] = [
        {n: m for n, m in modules.items() if n.startswith(f"{passes.name}.{i}.")} for i in range(blocks)]
    handlers = layer_handlers(modules, variants)
    shapes = {n: tuple(handlers[n].weight_matrix(m).shape) for n, m in modules.items()}
    decs: dict[str, Decomposition] = {}
    infos: dict[str, dict[str, Any]] = {}
    show = Progress("calibrating", blocks * (2 if sequential else 1), progress)
    weights: dict[str, torch.Tensor] = {}
    if weighting:
        show.say(f"output-side Fisher on {FISHER_SEQUENCES} sequences at most (forward and backward)")
        fisher = output_fisher(model, {n: m for n, m in modules.items() if n.startswith(f"{passes.name}.")},
                               batches, full=weighting == KFAC)
        weights, fisher = {n: _floored(f) for n, f in fisher.items()}, None
        release_freed_memory()  # the backward passes' activations: about 2 GB on Gemma 3 270M
        show.lead("output-side Fisher done")

    def own_rank(name: str, dec: Decomposition) -> int | None:
        """The rank a per-layer policy gives (None under a target: allocated across layers)."""
        if name in fixed:
            return fixed[name]
        if across_layers(policy):
            return None
        sp = LayerSpectrum.from_singular_values(name, *shapes[name], dec.S, pivoted=handlers[name].pivoted)
        return allocate(policy, [sp], rank_multiple)[name]

    # 1. Spectra on the original model's activations.
    carried: list[Any] | None = None
    for i in range(blocks):
        acc = {n: Moments() for n in per_block[i]}
        carried = passes.run(i, carried, pre=lambda n, _b, x, mask, acc=acc: accumulate(acc[n], modules[n], x, mask),
                             hooked=per_block[i])
        for n in per_block[i]:
            dec, infos[n] = decompose(modules[n], acc.pop(n), damping, handlers[n], weights.get(n), overwrite=True)
            # Sequential refits decompose every factored layer again: only the spectrum (the allocation's input)
            # is kept from this pass. Whole, these decompositions were 1.2 GB of Gemma 3 270M's peak.
            decs[n] = dec.truncated(0) if sequential else dec
            del dec
        release_freed_memory()
        show.step(f"block {i + 1}/{blocks} analysed")
    outer = {n: m for n, m in modules.items() if n not in decs}  # outside the blocks: embeddings, an untied head
    if outer:  # one pass past every block, ended before the head computes any logits
        acc = {n: Moments() for n in outer}
        passes.run(blocks, carried, pre=lambda n, _b, x, mask: accumulate(acc[n], outer[n], x, mask), hooked=outer,
                   stop=model.get_output_embeddings())
        for n in outer:
            decs[n], infos[n] = decompose(outer[n], acc.pop(n), damping, handlers[n], weights.get(n), overwrite=True)
    spectra = [_spectrum(n, shapes[n], decs[n], absolute=n in weights, pivoted=handlers[n].pivoted) for n in modules]
    ranks = allocate(policy, spectra, rank_multiple, fixed)

    def saving(name: str) -> bool:
        r = ranks.get(name)
        return r is not None and 1 <= r <= handlers[name].max_saving_rank(*shapes[name])

    refit = 0
    if sequential:
        del carried
        original: list[Any] | None = None
        compressed: list[Any] | None = None
        for i in range(blocks):
            original, compressed, n_refit = _refit_block(passes, i, per_block[i], original, compressed, ranks,
                                                         saving, decs, infos, handlers, damping, weights,
                                                         final=across_layers(policy))
            refit += n_refit
            release_freed_memory()
            show.step(f"block {i + 1}/{blocks} refit")
        if not across_layers(policy):  # per-layer policies: ranks of the refit spectra
            for n in modules:
                if n not in fixed and n not in outer:
                    ranks[n] = own_rank(n, decs[n])
    errors = {n: output_error(decs[n], infos[n], ranks[n]) for n in modules if saving(n)}
    info = calibration_info(batches, infos, sequential=sequential, refit=refit, hold_out=0, scales={},
                            damping=damping, spatial_layers=())
    info["passes"] = BLOCKWISE_PASSES
    if weights:
        info["allocation"] = ("whitened output error x diagonal output-side Fisher" if weighting == FISHER else
                              "whitened output error x output-gradient second moment (KFAC)")
        info["fisher_sequences"] = min(FISHER_SEQUENCES, sum(tensors_of(b)[0].shape[0] for b in batches))
    return Calibrated(decs, spectra, ranks, errors, info, {})


def _floored(f: torch.Tensor) -> torch.Tensor:
    """A Fisher (diagonal or full) plus ``FISHER_FLOOR`` times its mean diagonal: an output direction no
    calibration gradient reached still costs something, and the full matrix stays invertible."""
    if f.dim() == 1:
        return f + FISHER_FLOOR * f.mean().clamp(min=1e-30)
    diagonal = f.diagonal()  # a view: the matrix is changed in place (it is large)
    diagonal.add_(FISHER_FLOOR * diagonal.mean().clamp(min=1e-30))
    return f


def _spectrum(name: str, shape: tuple[int, ...], dec: Decomposition, absolute: bool, pivoted: bool) -> LayerSpectrum:
    """The allocator's view of a layer: relative error curve, or (``absolute``: Fisher-weighted, one scale
    for every layer) the weighted error itself."""
    sp = LayerSpectrum.from_singular_values(name, *shape, dec.S, pivoted=pivoted)
    if absolute:
        sp.loss = sp.loss * float(dec.S.double().square().sum())
    return sp


def _refit_block(passes: BlockPasses, i: int, layers: dict[str, nn.Module], original: list[Any] | None,
                 compressed: list[Any] | None, ranks: dict[str, int | None], saving: Callable[[str], bool],
                 decs: dict[str, Decomposition], infos: dict[str, dict[str, Any]], handlers: dict,
                 damping: tuple[float, ...], weights: dict[str, torch.Tensor], *, final: bool = False
                 ) -> tuple[list[Any], list[Any], int]:
    """Refit block ``i``'s factored layers group by group on the compressed prefix's inputs; returns the
    original and the compressed block's outputs per batch, and how many layers were refit."""
    todo = {n: m for n, m in layers.items() if saving(n)}
    if not todo:  # nothing factored here: both streams go through the original block
        return passes.run(i, original), passes.run(i, compressed), 0
    # Inputs of the original block's layers, per layer group and batch (layers of a group share one input).
    groups = _groups(passes, i, original, layers)
    first = {g[0]: g for g in groups}
    kept: dict[str, list[torch.Tensor]] = {g[0]: [] for g in groups}

    def keep(n: str, _b: int, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        kept[n].append(_rows(x, mask))

    new_original = passes.run(i, original, pre=keep, hooked={g: layers[g] for g in first})
    prefix = f"{passes.name}.{i}."
    work = copy.deepcopy(passes.blocks[i])  # the model's own block is never changed
    refit = 0
    for group in groups:
        wanted = [n for n in group if n in todo]
        if not wanted:
            continue
        mom = Moments()
        lead = work.get_submodule(group[0][len(prefix):])

        def add(_n: str, b: int, x: torch.Tensor, mask: torch.Tensor | None, g: str = group[0],
                mom: Moments = mom) -> None:
            mom.add(kept[g][b], _rows(x, mask))

        passes.run(i, compressed, block=work, pre=add, hooked={group[0]: lead}, stop=lead)
        for n in wanted:
            W = handlers[n].weight_matrix(layers[n])
            dec, infos[n] = whitened_decomposition(W, mom, damping, weights.get(n))
            # Under a budget across layers the rank is final: the rest of the decomposition is only memory until
            # the rewrite. A per-layer policy re-reads the rank from the refit spectrum afterwards: kept whole.
            decs[n] = dec.truncated(ranks[n]) if final else dec
            del dec
            _place(work, n[len(prefix):], factor_module(layers[n], ranks[n], decs[n], handlers[n].kind))
            refit += 1
        del kept[group[0]]
    return new_original, passes.run(i, compressed, block=work), refit


def _groups(passes: BlockPasses, i: int, carried: list[Any] | None, layers: dict[str, nn.Module]
            ) -> list[list[str]]:
    """Block ``i``'s layers grouped by the input they are called on, in call order (traced on batch 0)."""
    order: list[tuple[str, torch.Tensor]] = []  # the input itself, kept alive: ids of freed tensors recur

    def seen(n: str, _b: int, x: torch.Tensor, _mask) -> None:
        if not any(n == m for m, _ in order):
            order.append((n, x))

    one = BlockPasses(passes.model, passes.batches[:1])
    one.run(i, None if carried is None else carried[:1], pre=seen, hooked=layers)
    groups: list[list[str]] = []
    last = None
    for n, x in order:
        if groups and x is last:
            groups[-1].append(n)
        else:
            groups.append([n])
        last = x
    missing = set(layers) - {n for g in groups for n in g}
    if missing:
        raise CompressorError(f"layers {sorted(missing)[:3]} of block {passes.name}.{i} were not called on the "
                              "calibration data", "leave them out with --exclude, or calibrate another way")
    return groups


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A linear layer's input rows (tokens), padding left out by the batch's attention mask."""
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.to(torch.bool)]
    return x.reshape(-1, x.shape[-1])


def _place(root: nn.Module, dotted: str, layer: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, layer)


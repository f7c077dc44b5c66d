"""Calibration statistics of a Hugging Face decoder gathered one transformer block at a time (sequential
onloading, as llm-compressor does), so that a checkpoint bigger than memory is never held whole.

    cal = BlockCalibration(skeleton, read, batches, layers)   # skeleton: parameters on the meta device
    moments, outputs = cal.block(0, None)                     # block 0's layers; its outputs
    moments, outputs = cal.block(1, outputs)                  # ... carried to the next block
    moments = cal.outside(outputs)                            # embeddings and head, after the last block

The model runs on a skeleton whose parameters are on the meta device and whose buffers are real
(:func:`compressor.formats.hf.hf_skeleton` with ``buffers=True``: a rotary embedding's ``inv_freq`` is
computed, not read). The parameters outside the block list (embeddings, final norm, head) are read once, in
float32, when a module holding them first runs (the head only for the last pass). For block ``i``, only its
tensors are read (float32); every calibration batch runs through the whole model with blocks ``0..i-1``
replaced by stubs returning block ``i-1``'s recorded outputs, so block ``i`` receives exactly the arguments
the model passes it (attention mask, position embeddings, cache), however the model builds them; the pass
stops after block ``i``, whose outputs are kept for the next block, and its tensors go back to the meta
device. Hooks on the block's layers accumulate the same statistics as the in-memory
:class:`compressor.analysis.tracing.Calibrator` through the same function
(:func:`compressor.analysis.whitened.accumulate`), batch after batch in the same order, so the moments are the
same bits as in memory (on the same number of threads).

The outputs carried are the ORIGINAL block's, not a factored block's: the in-memory statistics this
mirrors are those of the unchanged model (sequential refits on a compressed model's inputs are not done).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import torch
from torch import nn

from compressor.analysis.whitened import Moments, accumulate
from compressor.core.errors import CompressorError
from compressor.core.hooks import StopForward, captured_inputs, captured_outputs, patched_forward, stop_after
from compressor.data.inputs import Batch, attention_mask, call, map_tensors


def block_list(model: nn.Module) -> str | None:
    """The name of the list of transformer blocks (``model.layers``, ``transformer.h``): of the ``ModuleList``
    whose items are all of one class, the one holding most parameters; None when there is none. (Not a share
    of the model: a small decoder's embeddings can outweigh its blocks.)"""
    best, size = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1:
            n = sum(p.numel() for p in mod.parameters())
            if n > size:
                best, size = name, n
    return best


def materialised_blocks(model: nn.Module, blocks: str) -> int:
    """How many blocks of the list ``blocks`` hold real (not meta) parameters now."""
    return sum(any(p.device.type != "meta" for p in b.parameters()) for b in model.get_submodule(blocks))


class BlockCalibration:
    """Block-by-block calibration passes over a meta skeleton; ``read(name)`` returns the checkpoint tensor
    of the skeleton parameter ``name`` (its dtype; used in float32). ``layers`` are the factorizable layers
    (by name) whose statistics are gathered."""

    def __init__(self, model: nn.Module, read: Callable[[str], torch.Tensor], batches: list[Batch],
                 layers: dict[str, nn.Module]) -> None:
        name = block_list(model)
        if name is None:
            raise CompressorError(f"no list of transformer blocks was found in {type(model).__name__} (no "
                                  "ModuleList of blocks of one kind)",
                                  "analyse it in memory (leave out --stream)")
        self.model, self.read, self.batches, self.name = model.eval(), read, batches, name
        self.blocks: nn.ModuleList = model.get_submodule(name)
        # Every name of each parameter: tied weights (a head sharing the embedding) are filled in once.
        slots: dict[int, list[tuple[nn.Module, str]]] = {}
        for mod in model.modules():
            for key, p in mod._parameters.items():
                if p is not None:
                    slots.setdefault(id(p), []).append((mod, key))
        self.slots = {n: slots[id(p)] for n, p in model.named_parameters()}
        self.layers = {i: {n: m for n, m in layers.items() if n.startswith(f"{name}.{i}.")}
                       for i in range(len(self.blocks))}
        self.outer = {n: m for n, m in layers.items() if not n.startswith(f"{name}.")}
        # The tensors outside the blocks are read when a module holding them first runs: the head (as large
        # as the embeddings) is not in memory while the blocks run.
        users: dict[nn.Module, list[str]] = {}
        for n in self.slots:
            if not n.startswith(f"{name}."):
                for mod, _ in self.slots[n]:
                    users.setdefault(mod, []).append(n)
        for mod, names in users.items():
            mod.register_forward_pre_hook(lambda _m, _a, names=names: self._fill(
                [n for n in names if self.model.get_parameter(n).device.type == "meta"]))

    def _fill(self, names: list[str]) -> None:
        with torch.no_grad():
            for n in names:
                p = nn.Parameter(self.read(n).float(), requires_grad=False)
                for mod, key in self.slots[n]:
                    mod._parameters[key] = p

    def _empty(self, names: list[str]) -> None:
        for n in names:
            old = self.model.get_parameter(n)
            p = nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device="meta"), requires_grad=False)
            for mod, key in self.slots[n]:
                mod._parameters[key] = p

    @contextmanager
    def loaded(self, i: int) -> Iterator[None]:
        """Block ``i``'s tensors read (float32) inside the block, back on the meta device after it."""
        names = [n for n in self.slots if n.startswith(f"{self.name}.{i}.")]
        try:
            self._fill(names)
            yield
        finally:
            self._empty(names)

    def block(self, i: int, carried: list[Any] | None, names: Collection[str] | None = None
              ) -> tuple[dict[str, Moments], list[Any]]:
        """Statistics of block ``i``'s layers (those in ``names``; None: all) and the block's outputs per batch,
        given block ``i-1``'s (``carried``; None for block 0). Call inside :meth:`loaded`."""
        outputs: list[Any] = []

        def keep(_i, _args, out):
            outputs.append(map_tensors(out, lambda t: t.detach().clone()))

        # The pass ends after the block it is for.
        with captured_outputs({i: self.blocks[i]}, keep), stop_after(self.blocks[i]):
            moments = self._passes(_only(self.layers[i], names), i, carried)
        if len(outputs) != len(self.batches):  # the model's forward does not run its blocks one after another
            raise CompressorError(f"block {self.name}.{i} of {type(self.model).__name__} ran {len(outputs)} times "
                                  f"for {len(self.batches)} calibration batches, so it cannot be calibrated block "
                                  "by block", "analyse it in memory (leave out --stream)")
        return moments, outputs

    def outside(self, carried: list[Any], names: Collection[str] | None = None) -> dict[str, Moments]:
        """Statistics of the layers outside the blocks (embeddings, head; those in ``names``, None: all), every
        block replaced by the last block's outputs (``carried``)."""
        return self._passes(_only(self.outer, names), len(self.blocks), carried)

    def _passes(self, layers: dict[str, nn.Module], stubs: int, carried: list[Any] | None) -> dict[str, Moments]:
        """One forward per batch with blocks ``0..stubs-1`` returning ``carried``, hooks on ``layers``."""
        acc = {n: Moments() for n in layers}
        state: dict[str, Any] = {}

        def pre(name: str, args: tuple) -> None:
            accumulate(acc[name], layers[name], args[0], state["mask"])

        def stub(_block, *_a, **_k):
            return map_tensors(carried[state["batch"]], lambda t: t.clone())

        with captured_inputs(layers, pre), patched_forward([self.blocks[j] for j in range(stubs)], stub), \
                torch.no_grad():
            for b, batch in enumerate(self.batches):
                state["batch"], state["mask"] = b, attention_mask(batch)
                with suppress(StopForward):  # the pass ends after the block it is for
                    call(self.model, batch)
        return acc


def _only(layers: dict[str, nn.Module], names: Collection[str] | None) -> dict[str, nn.Module]:
    return layers if names is None else {n: m for n, m in layers.items() if n in names}

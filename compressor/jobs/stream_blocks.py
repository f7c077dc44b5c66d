"""The model of a streamed run without its weights: the skeleton its layers are found on, the checkpoint
names of their tensors, and the calibrated passes that run it block by block, reading one block's tensors
at a time (:class:`Blockwise`)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from compressor.analysis.stream import LayerTask
from compressor.core.errors import CompressorError
from compressor.core.policies import LayerSpectrum, across_layers, allocate
from compressor.core.svd import max_saving_rank
from compressor.formats.shards import Checkpoint
from compressor.jobs.loading import weights_only_model
from compressor.jobs.stream_state import StreamState


def skeleton_of(source: Path, ckpt: Checkpoint, calibrated: bool = False) -> torch.nn.Module:
    """The module tree, without weights: from config.json for a Hugging Face folder, else the stand-in
    a bare state_dict gets (every 2-D ``X.weight`` a Linear, 3-5-D a conv). ``calibrated``: a decoder
    that can run block by block (real buffers, float32 parameters, on the meta device until read)."""
    if source.is_dir() and (source / "config.json").is_file():
        from compressor.formats.load import hf_config, hf_skeleton

        if calibrated:
            archs = hf_config(source).get("architectures") or []
            if not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
                raise CompressorError(f"a streamed run with calibration data runs a Hugging Face decoder block by "
                                      f"block, but '{source}' holds {', '.join(archs) or 'no named architecture'}",
                                      "analyse it in memory (leave out --stream), or leave out --calibration")
            return hf_skeleton(source, buffers=True).float()
        return hf_skeleton(source)
    if calibrated:
        raise CompressorError(f"a streamed run with calibration data runs the model block by block, but '{source}' "
                              "has no config.json describing the model",
                              "pass the Hugging Face folder it came from, or leave out --calibration")
    return weights_only_model({n: torch.empty(t.shape, dtype=t.dtype, device="meta")
                               for n, t in ckpt.tensors.items()})


def checkpoint_keys(skeleton: torch.nn.Module, ckpt: Checkpoint, layers: list[str]) -> dict[str, str]:
    """Skeleton parameter name -> checkpoint name for the layers' parameters. Hugging Face checkpoints of a
    task model may store the base model's weights with or without its prefix (``bert.``, ``model.``)."""
    return {name: checkpoint_key(skeleton, ckpt, name) for layer in layers
            for name in (f"{layer}.{p}" for p, _ in skeleton.get_submodule(layer).named_parameters())}


def checkpoint_key(skeleton: torch.nn.Module, ckpt: Checkpoint, name: str) -> str:
    """The checkpoint name of the skeleton parameter ``name``, its shape checked."""
    prefix = getattr(skeleton, "base_model_prefix", "") or ""
    tries = [name, f"{prefix}.{name}"] + ([name[len(prefix) + 1:]] if prefix and name.startswith(f"{prefix}.") else [])
    key = next((k for k in tries if k in ckpt.tensors), None)
    if key is None:
        raise CompressorError(f"the checkpoint has no tensor '{name}', which its config.json describes",
                              "repair or re-download the model folder")
    want = tuple(skeleton.get_parameter(name).shape)
    if ckpt.tensors[key].shape != want:
        raise CompressorError(f"tensor '{key}' has shape {list(ckpt.tensors[key].shape)}, but the config "
                              f"describes {list(want)}", "repair or re-download the model folder")
    return key


class Blockwise:
    """Calibrated streamed passes (:class:`compressor.analysis.blocks.BlockCalibration`): per block, its
    layers' whitened spectra (and factors where the rank follows from the layer's own spectrum) saved
    durably, then the block's outputs, so that a killed pass continues at the first unfinished block."""

    def __init__(self, skeleton: torch.nn.Module, ckpt: Checkpoint, tasks: dict[str, LayerTask], names: list[str],
                 batches: list, state: StreamState, policy, rank_multiple: int) -> None:
        self.skeleton, self.ckpt, self.tasks, self.names, self.batches = skeleton, ckpt, tasks, names, batches
        self.state, self.policy, self.rank_multiple = state, policy, rank_multiple
        self.index = {n: i for i, n in enumerate(names)}
        self.count = 0
        self.seconds: dict[str, float] = {}

    def run(self, ranks: dict[str, int | None] | None = None) -> None:
        """The first pass (``ranks`` None: spectra, and factors unless the policy is a target), or the second
        (factors at ``ranks``)."""
        from compressor.analysis.blocks import BlockCalibration

        if ranks is None:
            wanted = [n for n in self.names if not self.state.has(self.index[n])]
        else:
            wanted = [n for n in self.names if ranks[n] is not None and not self.state.has_factors(self.index[n])]
        if not wanted:
            return
        keys = {n: checkpoint_key(self.skeleton, self.ckpt, n) for n, _ in self.skeleton.named_parameters()}
        cal = BlockCalibration(self.skeleton, lambda n: self.ckpt.tensor(keys[n]), self.batches,
                               {n: self.tasks[n].module for n in self.names})
        self.count = len(cal.blocks)
        tag = "analyze" if ranks is None else "factor"
        pending = {i: [n for n in cal.layers[i] if n in wanted] for i in range(self.count)}
        outer = [n for n in cal.outer if n in wanted]
        last = self.count if outer else max((i + 1 for i, todo in pending.items() if todo), default=0)
        start, carried = self.state.carry(tag)
        for i in range(start, last):
            t = time.perf_counter()
            with cal.loaded(i):
                moments, outputs = cal.block(i, carried, pending[i])
                for n in pending[i]:
                    self._layer(n, moments.pop(n), ranks)  # each layer's statistics freed once used
            carried = outputs
            self.state.save_carry(tag, i + 1, carried)
            self.seconds[f"{tag} {i}"] = round(time.perf_counter() - t, 3)
        if outer:
            t = time.perf_counter()
            moments = cal.outside(carried, outer)
            for n in outer:
                self._layer(n, moments.pop(n), ranks)
            self.seconds[f"{tag} outside the blocks"] = round(time.perf_counter() - t, 3)

    def _layer(self, name: str, moments, ranks: dict[str, int | None] | None) -> None:
        from compressor.analysis.calibration import decompose

        task = self.tasks[name]
        t = time.perf_counter()
        dec, info = decompose(task.module, moments, overwrite=True)  # its moments are not used again
        m, n = task.handler.weight_matrix(task.module).shape
        rank = ranks[name] if ranks is not None else None
        if ranks is None and not across_layers(self.policy):
            spectrum = LayerSpectrum.from_singular_values(name, m, n, dec.S)
            rank = allocate(self.policy, [spectrum], self.rank_multiple)[name]
        factors = None
        if rank is not None and rank <= max_saving_rank(m, n):
            new = task.handler.factor(task.module, rank, dec)  # float32, written in the checkpoint's dtype
            dtype = self.ckpt.tensors[task.keys["weight"]].dtype
            prefix = task.keys["weight"].rpartition(".")[0]
            factors = {f"{prefix}.{k}": v.to(dtype).contiguous() for k, v in new.state_dict().items()}
        i = self.index[name]
        if ranks is not None:
            self.state.save_factors(i, {"factors": factors})
        else:
            self.state.save_layer(i, {"S": dec.S.contiguous(), "total": None, "check": None, "factors": factors,
                                      "seconds": round(time.perf_counter() - t, 3), "calibration": info})


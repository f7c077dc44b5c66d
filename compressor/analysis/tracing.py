"""Calibration passes over a model with forward hooks; the model's weights are never changed.

:class:`Calibrator` streams every factorizable layer's input statistics (:func:`compressor.analysis.whitened.
accumulate`), traces the call order (layers reading one input form a group), pairs the original model's inputs
with those of a model whose earlier layers run compressed (sequential correction), and measures how much the
model's outputs move when layers are replaced (sensitivity probes). A probe replays what the model computes
before its layer instead of running it again (:class:`Replay`, :class:`_Prefix`). The moments pass, which runs every
batch anyway, also traces the call order and records what probes replay and compare against, so a calibrated
analysis runs each batch once before its probes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from compressor.analysis.whitened import Moments, accumulate
from compressor.core.handlers import handler_for
from compressor.core.hooks import StopForward, captured_inputs, captured_outputs, patched_forward
from compressor.data.inputs import Batch, attention_mask, call, relative_change, to_device

# ------------------------------------------------------------------------------------------- passes


@contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, t in modes.items():
            m.train(t)


def _forward(model: nn.Module, batch: Batch) -> Any:
    try:
        return call(model, batch)
    except StopForward:
        return None


def _call_order() -> tuple[list[tuple[str, int]], Callable[[str, tuple], None]]:
    """``(seen, hook)``: as a pre-hook of the layers (:func:`captured_inputs`) during one forward, ``hook`` lists
    each call in ``seen`` as ``(layer, key of its input)``; layers reading the same input share the key."""
    seen: list[tuple[str, int]] = []
    alive = []  # inputs held during the trace, so that no two share a (freed and reused) address

    def pre(name, args):
        x = args[0] if args else None
        alive.append(x)
        seen.append((name, x.data_ptr() if isinstance(x, torch.Tensor) else id(x)))

    return seen, pre


@dataclass
class Calibrator:
    """Runs calibration passes over one model with hooks; the model's weights are never changed."""

    model: nn.Module
    modules: dict[str, nn.Module]  # factorizable layers, by name
    batches: list[Batch]
    outputs: Sequence[str] | None = None  # the outputs sensitivity compares (None: every float output)
    device: torch.device = field(init=False)
    _traced: tuple[list[list[str]], bool] | None = field(init=False, default=None, repr=False)
    # What probes and joint errors replay and compare against (:meth:`_references`), recorded once.
    _refs: tuple[Any, list[Any]] | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        p = next(iter(self.model.parameters()), None)
        self.device = p.device if p is not None else torch.device("cpu")
        self.batches = [to_device(b, self.device) for b in self.batches]

    @property
    def order(self) -> list[list[str]]:
        """Groups of layers reading the same input, in call order."""
        return self._trace()[0]

    @property
    def repeated(self) -> bool:
        """Whether a layer is called more than once per forward."""
        return self._trace()[1]

    def _trace(self) -> tuple[list[list[str]], bool]:
        # One forward, run only when asked and not traced in the moments pass already (:meth:`moments`).
        if self._traced is None:
            seen, pre = _call_order()
            with _eval(self.model), captured_inputs(self.modules, pre):
                call(self.model, self.batches[0])
            self._traced = self._groups(seen)
        return self._traced

    def _groups(self, seen: list[tuple[str, int]]) -> tuple[list[list[str]], bool]:
        """:attr:`order` and :attr:`repeated` from the layers' calls in one forward (:func:`_call_order`)."""
        names = [n for n, _ in seen]
        repeated = len(names) != len(set(names))
        groups: list[list[str]] = []
        key_of: dict[int, int] = {}
        for name, key in seen:
            if any(name in g for g in groups):
                continue
            if key in key_of:
                groups[key_of[key]].append(name)
            else:
                key_of[key] = len(groups)
                groups.append([name])
        never = [n for n in self.modules if not any(n in g for g in groups)]
        return groups + [[n] for n in never], repeated

    def _rows(self, name: str, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        mod = self.modules[name]
        return handler_for(mod).input_rows(mod, x, mask)

    def moments(self, hold_out: int = 0) -> tuple[dict[str, Moments], dict[str, Moments] | None]:
        """``X^T X`` of every layer's input on the unchanged model, in one pass over the data; and, with
        ``hold_out``, the same without the first ``hold_out`` batches (None without).

        Layers with many rows per batch (convs at high resolution) use a fixed random subset of
        ``ROWS_PER_FEATURE`` rows per input feature, weighted up to the full count: neighbouring positions
        are nearly duplicates, and the products of all of them dominated calibration time.

        The same pass traces the layers' call order (its first batch) and, with ``hold_out``, records the
        references that probes and joint errors replay and compare against (:meth:`_references`: the held-out
        batches' outputs): no forward of its own for either."""
        acc = {name: Moments() for name in self.modules}
        held = None
        mask = None
        seen, trace = _call_order() if self._traced is None else ([], None)
        tracing = trace is not None

        def pre(name, args):
            if tracing:
                trace(name, args)
            accumulate(acc[name], self.modules[name], args[0], mask)

        order = self.batches[hold_out:] + self.batches[:hold_out]  # the held-out batches last
        prefix = self._prefix(None) if hold_out else None
        refs = []
        with _eval(self.model), captured_inputs(self.modules, pre), ExitStack() as recording:
            for i, b in enumerate(order):
                mask = attention_mask(b)
                if hold_out and i == len(order) - hold_out:  # the held-out batches, first to last, in one recording
                    held = {n: m.copy() for n, m in acc.items()}
                    recording.enter_context(prefix.recording())
                with prefix.tracing() if i == 0 and isinstance(prefix, _Prefix) else nullcontext():
                    out = call(self.model, b)
                if held is not None:
                    refs.append(out)
                if tracing:  # (dropping the hook frees the inputs it held)
                    self._traced, tracing, trace = self._groups(seen), False, None
        if hold_out:
            self._refs = prefix, refs
        return acc, held

    def _prefix(self, batch: Batch | None) -> Any:
        """What replays a forward up to a layer: the model itself when it can (:class:`Replay`, an ONNX graph's
        onnxruntime segments are no modules to replay), else a :class:`_Prefix` over every layer, traced on
        ``batch`` (None: by the caller, in :meth:`_Prefix.tracing`)."""
        return self.model if isinstance(self.model, Replay) else \
            _Prefix(self.model, batch, list(self.modules.values()))

    def forget_references(self) -> None:
        """Release the recorded references (a later probe records them again)."""
        self._refs = None

    def _references(self, limit: int) -> tuple[Any, list[Any]]:
        """The prefix every probe and joint error replays and the model's outputs on the first ``limit`` batches,
        recorded in one reference pass (or in :meth:`moments`) and reused by every later call that needs no more
        batches."""
        if self._refs is None or len(self._refs[1]) < limit:
            with _eval(self.model):
                prefix = self._prefix(self.batches[0])
                with prefix.recording():
                    self._refs = prefix, [call(self.model, b) for b in self.batches[:limit]]
        return self._refs

    def original_inputs(self, budget_bytes: int) -> dict[str, list[torch.Tensor | None]] | None:
        """Every layer group's input rows on the original model, per batch (one pass), or None when
        they would take more than ``budget_bytes``: then each sequential step recomputes them."""
        firsts = {g[0]: g for g in self.order}
        need = 0

        def size(name, args):
            nonlocal need
            rows = self._rows(name, args[0], mask)
            need += 0 if rows is None else rows.numel() * 4

        store: dict[str, list[torch.Tensor | None]] = {n: [] for n in firsts}

        def keep(name, args):
            rows = self._rows(name, args[0], mask)
            store[name].append(None if rows is None else rows.float())

        mods = {n: self.modules[n] for n in firsts}
        with _eval(self.model), captured_inputs(mods, size):
            mask = attention_mask(self.batches[0])
            call(self.model, self.batches[0])
        if self.repeated or need * len(self.batches) > budget_bytes:
            return None
        with _eval(self.model), captured_inputs(mods, keep):
            for b in self.batches:
                mask = attention_mask(b)
                call(self.model, b)
        return store

    def paired_moments(self, group: list[str], replaced: dict[str, nn.Module],
                       originals: dict[str, list[torch.Tensor | None]] | None = None) -> dict[str, Moments]:
        """Moments of ``group``'s input on the original model (X) paired with the model whose layers in
        ``replaced`` run compressed (X^), batch by batch. The members of a group read the same input."""
        acc = {name: Moments() for name in group}
        captured: dict[str, torch.Tensor] = {}
        mods = {n: self.modules[n] for n in group}
        first = group[0]

        def capture(name, args):
            captured[name] = args[0]
            if name == first and not self.repeated:
                raise StopForward

        def swap(name, args, out):
            return replaced[name](args[0])

        with _eval(self.model):
            for i, b in enumerate(self.batches):
                mask = attention_mask(b)
                if originals is None:
                    with captured_inputs(mods, capture):
                        _forward(self.model, b)
                    x = self._rows(first, captured[first], mask)
                else:
                    x = originals[first][i]
                with captured_outputs({n: self.modules[n] for n in replaced}, swap), captured_inputs(mods, capture):
                    _forward(self.model, b)
                h = self._rows(first, captured[first], mask)
                if x is not None:
                    for name in group:
                        acc[name].add(x, h)
        return acc

    def joint_errors(self, candidates: dict[str, dict[str, nn.Module]], limit: int) -> dict[str, float]:
        """Relative change of the model's compared outputs when all of a candidate's layers are replaced at once
        (``{candidate: {layer: replacement}}``), over the first ``limit`` calibration batches."""
        batches = self.batches[:limit]
        out: dict[str, float] = {}
        # As in prober: what finishes before a candidate's first replaced layer is replayed, not recomputed.
        prefix, refs = self._references(limit)
        refs = refs[:limit]
        with _eval(self.model):
            order = {n: i for i, n in enumerate(n for g in self.order for n in g)}
            for key, replaced in candidates.items():
                def swap(name, args, _out, replaced=replaced):
                    return replaced[name](args[0])
                first = self.modules[min(replaced, key=order.__getitem__)] if replaced else None
                results = []
                for i, (b, ref) in enumerate(zip(batches, refs, strict=True)):
                    replay = prefix.replaying(first, i) if first is not None else nullcontext()
                    with replay, captured_outputs({n: self.modules[n] for n in replaced}, swap):
                        results.append((call(self.model, b), ref, attention_mask(b)))
                out[key] = relative_change(results, self.outputs)
        return out

    def output_errors(self, replacements: dict[str, nn.Module], limit: int) -> dict[str, float]:
        """Relative change of the model's compared outputs (:func:`compressor.data.inputs.relative_change`)
        when each layer alone is replaced, over the first ``limit`` calibration batches."""
        return self.prober(limit)(replacements)

    def prober(self, limit: int) -> Callable[[dict[str, nn.Module]], dict[str, float]]:
        """:meth:`output_errors` for any of the layers, as often as asked, after one reference pass (shared with
        :meth:`joint_errors`, and none of its own after :meth:`moments` with held-out batches).

        Everything the model computes before a probed layer is the same as in the reference pass, so the
        modules that finish before it return their reference outputs instead of running again: each probe
        pays only for the part of the model from its layer on (about half the probe time on MobileNetV2)."""
        batches = self.batches[:limit]
        prefix, refs = self._references(limit)
        refs = refs[:limit]

        def measure(replacements: dict[str, nn.Module]) -> dict[str, float]:
            out: dict[str, float] = {}
            with _eval(self.model):
                for name, new in replacements.items():
                    results = []
                    for i, (b, ref) in enumerate(zip(batches, refs, strict=True)):
                        swap = captured_outputs({name: self.modules[name]}, lambda _n, args, _o, new=new: new(args[0]))
                        with prefix.replaying(self.modules[name], i), swap:
                            results.append((call(self.model, b), ref, attention_mask(b)))
                    out[name] = relative_change(results, self.outputs)
            return out
        return measure


@runtime_checkable
class Replay(Protocol):
    """A model that itself replays the part of a forward pass before a layer (as :class:`_Prefix` does for
    torch modules): the k-th forward run in one ``recording()`` is batch k for ``replaying(layer, k)``, in which
    a forward on that batch computes what a full one would, running only from ``layer`` on."""

    def recording(self) -> AbstractContextManager[None]: ...

    def replaying(self, layer: nn.Module, batch: int) -> AbstractContextManager[None]: ...


class _Prefix:
    """Reference outputs of the modules that can stand in for re-running a model's prefix.

    A module qualifies when it is called once per forward, returns a tensor and has no ``forward`` of its
    own instance; for a layer, the outermost qualifying modules that finish before the layer starts (in the
    traced call order) are replayed from their reference outputs. Models that call a module more than once
    per forward are run in full (the call order would not say which call precedes which). Only the modules
    some probed layer replays are recorded, not every activation of the model."""

    def __init__(self, model: nn.Module, batch: Batch | None, layers: Sequence[nn.Module]) -> None:
        """Traced on a forward of ``batch``; None: on the caller's next forward, inside :meth:`tracing`."""
        self.children = {m: list(m.children()) for m in model.modules()}
        self.root = model
        self.layers = list(layers)
        if batch is not None:
            with self.tracing():
                call(model, batch)

    @contextmanager
    def tracing(self) -> Iterator[None]:
        """Trace the (one) forward run inside: which modules finish before each layer starts."""
        span: dict[nn.Module, list[int]] = {}
        tensor_out: set[nn.Module] = set()
        clock = 0
        calls: dict[nn.Module, int] = {}

        def pre(mod, _args):
            nonlocal clock
            calls[mod] = calls.get(mod, 0) + 1
            span[mod] = [clock, -1]
            clock += 1

        def post(mod, _args, out):
            nonlocal clock
            span[mod][1] = clock
            clock += 1
            if isinstance(out, torch.Tensor):
                tensor_out.add(mod)

        every = {m: m for m in self.children}
        with captured_inputs(every, pre), captured_outputs(every, post):
            yield
        self.span = span
        self.usable = {m for m in tensor_out if calls[m] == 1 and "forward" not in m.__dict__} \
            if all(c == 1 for c in calls.values()) else set()
        self.before = {layer: self._before(layer) for layer in self.layers}
        self.cache: dict[nn.Module, list[torch.Tensor]] = {m: [] for ms in self.before.values() for m in ms}

    def _before(self, layer: nn.Module) -> list[nn.Module]:
        """The outermost usable modules that finish before ``layer`` starts."""
        if layer not in self.span or not self.usable:
            return []
        start, found, stack = self.span[layer][0], [], [self.root]
        while stack:
            m = stack.pop()
            if m in self.usable and m is not self.root and self.span[m][1] < start:
                found.append(m)
            elif m not in self.span or self.span[m][0] < start:  # started before the layer, or a container
                stack.extend(self.children[m])                    # never called itself (a ModuleList): look inside
        return found

    @contextmanager
    def recording(self) -> Iterator[None]:
        # Cloned: a later in-place op (an in-place ReLU, ``x += ...``) may change the returned tensor.
        with captured_outputs({m: m for m in self.cache}, lambda mod, _a, out: self.cache[mod].append(out.clone())):
            yield

    @contextmanager
    def replaying(self, layer: nn.Module, batch: int) -> Iterator[None]:
        # A clone, as when recording.
        with patched_forward(self.before[layer], lambda m, *_a, **_k: self.cache[m][batch].clone()):
            yield

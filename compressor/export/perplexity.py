"""Perplexity of an exported causal language model (an ONNX file, fp32 or any variant) in onnxruntime, by
the protocol of :mod:`compressor.data.perplexity`, without ever holding a window's full logits.

The graph is cut in two where its output head begins: the *trunk* (the graph's inputs to the last
hidden state) runs once per window, and the *head* (that state to ``logits``: the output projection,
soft-capping, and whatever a variant added around it, casts or quantization) runs on chunks of positions,
each chunk's logits under :data:`compressor.data.perplexity.HEAD_CHUNK_BYTES`. The cut is the last tensor
every path from the graph's inputs to ``logits`` passes through before a matrix product: everything after
it acts on each position alone, so running it by chunks gives the same logits, except that a dynamic int8
head computes its activation scale from the positions it is given (per chunk here; per token when a
deployed model decodes one token at a time), which the result's notes say.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from compressor.core.errors import CompressorError
from compressor.core.fileio import regular_file
from compressor.data.perplexity import Corpus, Perplexity, head_chunk, run_protocol, token_nll
from compressor.formats.runtime import session

# Operations that multiply activations by a weight matrix: the output head holds exactly one of them.
_PRODUCTS = {"MatMul", "Gemm", "MatMulInteger", "MatMulNBits", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
             "QLinearMatMul", "FusedMatMul"}
# A serialized ONNX model past this many bytes cannot be handed to onnxruntime in memory (protobuf's limit).
_PROTOBUF_LIMIT = 2**31 - 1


def onnx_perplexity(path: str | Path, corpus: Corpus, *, window: int, stride: int | None = None,
                    bos: bool = True, max_windows: int | None = None, threads: int | None = None) -> Perplexity:
    """The perplexity of the exported causal language model at ``path`` on ``corpus``, by the protocol
    of :func:`compressor.data.perplexity.perplexity` (``window`` is required: a graph does not say its
    context). The graph's inputs are fed from each window: ``input_ids``, ``attention_mask`` (ones) and
    ``position_ids`` where declared; any other input is refused. ``threads``: onnxruntime's intra-op
    threads (None: its default)."""
    split = HeadSplit(path, threads)

    def window_nll(ids: torch.Tensor, rows: slice, targets: torch.Tensor) -> torch.Tensor:
        hidden = split.hidden(ids)[rows]
        step = split.chunk(hidden)
        return torch.cat([token_nll(torch.from_numpy(split.logits(hidden[i:i + step])), targets[i:i + step])
                          for i in range(0, len(targets), step)])

    result = run_protocol(corpus, window, stride, bos, max_windows, window_nll)
    return Perplexity.from_dict({**result.to_dict(), "notes": split.notes(window)})


class HeadSplit:
    """The ONNX file at ``path`` as two onnxruntime sessions, its trunk and its output head (see the
    module's docstring); refuses (one line) a graph without a head to cut."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnx

        path = regular_file(path, "ONNX file")
        try:
            model = onnx.load(str(path))  # with its external data: the two parts carry their weights
        except Exception as err:  # a damaged or foreign file
            raise CompressorError(f"cannot read the ONNX file '{path}' ({type(err).__name__})",
                                  "pass an ONNX file written by compress") from None
        names = [o.name for o in model.graph.output]
        if not names:
            raise CompressorError(f"the ONNX file '{path}' has no outputs", "pass an exported causal language model")
        self.output = "logits" if "logits" in names else names[0]
        self.cut = find_head(model.graph, self.output)
        if self.cut is None:
            raise CompressorError(f"no output head (a matrix product acting on each position) leads to "
                                  f"'{self.output}' in '{path}'",
                                  "pass an exported causal language model whose output is its logits")
        untyped = onnx.helper.make_value_info(self.cut, onnx.TypeProto())  # onnxruntime infers it
        self.trunk = _session(_sub_model(model, list(model.graph.input), [untyped]), threads)
        # The head's input type is the trunk's output type, known once the trunk has run.
        self._head_model = _sub_model(model, [untyped], [o for o in model.graph.output if o.name == self.output])
        self._head_ops = {n.op_type for n in self._head_model.graph.node}
        self._threads = threads
        self._head = None
        self._chunk: int | None = None
        self._rows = 0  # the most positions one run of the head was given

    def hidden(self, ids: torch.Tensor) -> np.ndarray:
        """The ``(positions, hidden)`` state where the head begins, for input ids ``(1, positions)``."""
        return self.trunk.run([self.cut], _feed(self.trunk, ids))[0][0]

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """The head's ``(positions, vocab)`` logits for some positions of :meth:`hidden`."""
        if self._head is None:
            import onnx

            self._head_model.graph.input[0].CopyFrom(
                onnx.helper.make_tensor_value_info(self.cut, onnx.helper.np_dtype_to_tensor_dtype(hidden.dtype),
                                                   [1, None, hidden.shape[-1]]))
            self._head = _session(self._head_model, self._threads)
            self._head_model = None  # the session holds the weights now
        self._rows = max(self._rows, len(hidden))
        return self._head.run([self.output], {self.cut: hidden[None]})[0][0]

    def chunk(self, hidden: np.ndarray) -> int:
        """Positions per run of the head (:func:`compressor.data.perplexity.head_chunk` of its vocabulary)."""
        if self._chunk is None:
            self._chunk = head_chunk(int(self.logits(hidden[:1]).shape[-1]))
        return self._chunk

    def notes(self, window: int) -> list[str]:
        """How running the head on some positions at a time departs from running the whole graph on a
        window of ``window`` positions, if it does: only a dynamic int8 head's scale depends on them."""
        if self._head_ops & {"DynamicQuantizeLinear", "DynamicQuantizeMatMul"} and 0 < self._rows < window:
            return [f"the int8 output head's activation scale was computed over at most {self._rows} positions "
                    f"at a time (over the window's {window} in one run of the whole file)"]
        return []


def _feed(session: Any, ids: torch.Tensor) -> dict[str, np.ndarray]:
    """The window's inputs by the names the graph declares, in the integer type it declares."""
    n = ids.shape[1]
    values = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(n)[None]}
    feed = {}
    for i in session.get_inputs():
        if i.name not in values:
            raise CompressorError(f"the ONNX graph takes an input '{i.name}' that perplexity cannot fill "
                                  "(only input_ids, attention_mask and position_ids)",
                                  "export the model with input_ids and attention_mask only")
        feed[i.name] = values[i.name].numpy().astype(np.int32 if i.type == "tensor(int32)" else np.int64)
    return feed


def find_head(graph: Any, output: str) -> str | None:
    """The tensor where the output head begins: the one nearest to ``output`` through which every path
    from a graph input to ``output`` runs, with a matrix product between the two; None when there is none."""
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for x in node.input:
            consumers.setdefault(x, []).append(node)
    # Tensors computed from the graph's inputs (nodes are in topological order in a valid graph).
    dynamic = {i.name for i in graph.input} - {t.name for t in graph.initializer}
    inputs = set(dynamic)
    for node in graph.node:
        if any(x in dynamic for x in node.input):
            dynamic.update(node.output)
    order = {out: k for k, node in enumerate(graph.node) for out in node.output}
    ancestors = _upstream(producer, output)
    for name in sorted(ancestors & dynamic - inputs, key=order.__getitem__, reverse=True):
        if _reaches(producer, output, inputs, avoiding=name):
            continue
        between = _downstream(consumers, name) & (ancestors | {output})
        if any(producer[t].op_type in _PRODUCTS for t in between):
            return name
    return None


def _upstream(producer: dict[str, Any], name: str) -> set[str]:
    """The tensors ``name`` is computed from, through nodes (``name`` excluded)."""
    stack, seen = [name], set()
    while stack:
        t = stack.pop()
        for x in producer[t].input if t in producer else ():
            if x and x not in seen:
                seen.add(x)
                stack.append(x)
    return seen


def _downstream(consumers: dict[str, list[Any]], name: str) -> set[str]:
    """The tensors computed from ``name`` (``name`` excluded)."""
    stack, seen = [name], set()
    while stack:
        for node in consumers.get(stack.pop(), ()):
            for out in node.output:
                if out not in seen:
                    seen.add(out)
                    stack.append(out)
    return seen


def _reaches(producer: dict[str, Any], name: str, inputs: set[str], avoiding: str) -> bool:
    """Whether ``name`` is computed from a graph input along a path that does not pass through ``avoiding``."""
    stack, seen = [name], set()
    while stack:
        t = stack.pop()
        if t in inputs:
            return True
        if t == avoiding or t in seen or t not in producer:
            continue
        seen.add(t)
        stack.extend(x for x in producer[t].input if x)
    return False


def _sub_model(model: Any, inputs: list[Any], outputs: list[Any]) -> Any:
    """The part of ``model`` computing ``outputs`` from ``inputs`` (their value infos), with the nodes and
    initializers it needs."""
    import onnx

    given = {i.name for i in inputs}
    producer = {out: node for node in model.graph.node for out in node.output}
    needed, stack = set(), [o.name for o in outputs]
    while stack:
        t = stack.pop()
        if t in given or t not in producer or id(producer[t]) in needed:
            continue
        needed.add(id(producer[t]))
        stack.extend(x for x in producer[t].input if x)
        for attr in producer[t].attribute:  # a subgraph (If, Loop) reads tensors of the outer graph by name
            for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                stack.extend(x for n in sub.node for x in n.input if x)
    nodes = [n for n in model.graph.node if id(n) in needed]
    used = {x for n in nodes for x in n.input} | {x for n in nodes for a in n.attribute
                                                 for g in ([a.g] if a.HasField("g") else []) + list(a.graphs)
                                                 for m in g.node for x in m.input}
    graph = onnx.helper.make_graph(nodes, model.graph.name, [i for i in inputs if i.name in used],
                                   outputs, [t for t in model.graph.initializer if t.name in used])
    sub = onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    sub.functions.extend(model.functions)
    return sub


def _session(model: Any, threads: int | None) -> Any:
    data = model.SerializeToString() if model.ByteSize() <= _PROTOBUF_LIMIT else None
    if data is None:
        raise CompressorError("the ONNX model's weights are over 2 GB, which perplexity cannot yet hold in one "
                              "onnxruntime session", "measure the torch model's perplexity instead")
    return session(data, threads=threads)

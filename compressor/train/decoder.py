"""Distillation losses for causal language models (decoders) that never hold a whole batch of logits.

    h = head_inputs(model, batch)                     # the final hidden states the head would read
    lm = LMLoss(model, teacher, "kl", temperature=1)
    value = lm(h, head_inputs(teacher, batch), batch) # scalar; value.backward() reaches the model's weights

A decoder's output is a distribution over its vocabulary at every position: Gemma 3's 262,144 tokens make
the logits of one 32 x 128-token batch 4 GB in float32, and their gradient as much again. The model is
therefore run only up to its output head (a pre-hook on the head captures its input and stops the pass),
and the losses apply the head (and Gemma's final logit soft-capping) to a chunk of positions
(:func:`compressor.data.perplexity.head_chunk`: 64 MiB of float32 logits) at a
time. Each chunk's gradient with respect to the hidden states (and any trained head weights) is taken as
soon as its loss is, inside one autograd node (:class:`_ChunkedHead`), so a backward pass never keeps more
than one chunk of logits: peak memory is a chunk of student and teacher logits, not the batch's.

The losses, per position (padding left out; ``kl`` on every position, ``ce`` on every position with a next
token):

* ``kl``: ``T^2 KL(p_teacher || p_student)`` of the next-token distributions softened by the temperature
  ``T`` (what the teacher says about every token, not only the one the text holds);
* ``ce``: the student's next-token negative log-likelihood of the text (no teacher needed).

**The text's tokens** (``vocabulary``): with ``kl``, a training step may compare the two distributions over
a subset of the vocabulary only, each renormalised over it: :func:`text_tokens`, the distinct tokens of the
training and validation text. The head is then ``|subset| x hidden`` instead of ``vocabulary x hidden``: on
Gemma 3 270M (262,144 tokens) its three applications a step (teacher, student, the student's backward pass)
were most of a step's arithmetic, and the docstring text's 128 x 128 calibration tokens hold 2,400 distinct
ones. Why it still teaches the whole distribution: the logits are ``E h``; when the student's agree with the
teacher's over many more rows of ``E`` than the hidden width, its hidden state agrees with the teacher's, and so
do the logits of every other token. A subset under :data:`MIN_TOKENS_PER_WIDTH` times the hidden width is not
used (the whole vocabulary is). Validation (the best step) always compares over the whole vocabulary.

Whatever the loss, :func:`evaluate` also reports ``val_nll``, the student's next-token NLL on the held-out
text (``exp`` of it is the perplexity), measured on the same chunks at no extra cost.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from compressor.analysis.decoder import is_decoder
from compressor.core.errors import CompressorError
from compressor.core.hooks import StopForward, captured_inputs, stop_before
from compressor.data.inputs import Batch, attention_mask, call, take, tensors_of
from compressor.data.perplexity import head_chunk

LM_LOSSES = ("kl", "ce")
IGNORE = -100  # next-token target of a position without one (the last of a sequence, padding)
# The fewest tokens per hidden unit a kl step compares over when it is given a subset (module doc).
MIN_TOKENS_PER_WIDTH = 2


def is_causal_lm(model: nn.Module) -> bool:
    """A decoder whose head can be applied chunk by chunk (:func:`compressor.analysis.decoder.is_decoder`
    with an output head)."""
    return is_decoder(model) and model.get_output_embeddings() is not None


def uncached(batch: Batch) -> Batch:
    """``batch`` (named inputs) asking the model to keep no key/value cache: a cache made by a forward pass is
    handed to every block as an argument, and a block run again on captured arguments (block-wise healing
    runs each one many times) would append to it and attend to its own earlier calls."""
    return {**batch, "use_cache": False} if isinstance(batch, Mapping) else batch


def head_inputs(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The hidden states ``model`` feeds its output head on ``batch`` (``batch x length x hidden``), with the
    graph to the model's weights when gradients are enabled; the head itself does not run."""
    head = model.get_output_embeddings()
    state: dict[str, torch.Tensor] = {}
    # The hidden states are captured, the head need not run.
    with captured_inputs({"head": head}, lambda _k, args: state.__setitem__("hidden", args[0])), \
            stop_before(head), suppress(StopForward):
        call(model, uncached(batch))
    if "hidden" not in state:
        raise CompressorError(f"{type(model).__name__}'s forward pass does not call its output head",
                              "heal it as a plain model (it is not a causal language model)")
    return state["hidden"]


def logits_fn(model: nn.Module, head: Callable[[torch.Tensor], torch.Tensor] | None = None
              ) -> Callable[[torch.Tensor], torch.Tensor]:
    """Hidden states -> logits as the model computes them: its head (or ``head``, a part of it), then Gemma's
    soft-capping if set."""
    head = head if head is not None else model.get_output_embeddings()
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if not cap:
        return head
    return lambda h: torch.tanh(head(h) / cap) * cap


def _rows(batch: Batch, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per flattened position: whether it counts for ``kl`` (not padding), and its next-token target for
    ``ce`` (:data:`IGNORE` at a sequence's last position and where it or the next one is padding)."""
    ids = batch["input_ids"] if isinstance(batch, dict) and "input_ids" in batch else tensors_of(batch)[0]
    mask = attention_mask(batch)
    mask = torch.ones(ids.shape, dtype=torch.bool) if mask is None else mask.bool()
    mask = mask.to(hidden.device)
    ids = ids.to(hidden.device)
    target = torch.full_like(ids, IGNORE)
    target[:, :-1] = torch.where(mask[:, :-1] & mask[:, 1:], ids[:, 1:], IGNORE)
    return mask.reshape(-1), target.reshape(-1)


class _ChunkedHead(torch.autograd.Function):
    """``loss(hidden, *params)`` whose value and gradients ``run`` computes chunk by chunk in the forward
    pass; the backward pass only scales them, so no logits outlive their chunk."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, run: Callable, *params: torch.Tensor) -> torch.Tensor:
        value, grads = run(hidden, params)
        ctx.grads = grads
        return value

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return (None if ctx.grads[0] is None else ctx.grads[0] * grad, None,
                *(None if g is None else g * grad for g in ctx.grads[1:]))


class LMLoss:
    """The ``loss`` (``kl`` or ``ce``) of ``model``'s next-token distributions, against ``teacher``'s for
    ``kl``, from the hidden states each feeds its head (:func:`head_inputs`)."""

    def __init__(self, model: nn.Module, teacher: nn.Module | None, loss: str, temperature: float = 1.0,
                 chunk: int | None = None, vocabulary: torch.Tensor | None = None) -> None:
        if loss not in LM_LOSSES:
            raise CompressorError(f"loss {loss} compares outputs of one kind, but a causal language model's are "
                                  "next-token distributions", "pass loss= (--loss) kl or ce, or leave it out")
        if loss == "kl" and teacher is None:
            raise CompressorError("loss kl compares with a teacher's next-token distributions, and no teacher "
                                  "was given", "pass teacher= (the uncompressed model), or loss='ce'")
        # None: as many positions as keep a chunk's float32 logits under data.perplexity.HEAD_CHUNK_BYTES (the
        # head may be wrapped for training, so its vocabulary is read from the config)
        self.chunk = chunk if chunk is not None else head_chunk(model.config.vocab_size)
        self.loss, self.temperature = loss, temperature
        self.student = logits_fn(model)
        self.teacher = logits_fn(teacher) if teacher is not None else None
        self.head_params = [p for p in model.get_output_embeddings().parameters() if p.requires_grad]
        # Training steps of kl over ``vocabulary`` only (module doc); a head that trains, or one that is not a
        # plain linear layer (simulated quantization wraps it), is applied whole.
        self.sub = None
        weight = getattr(model.get_output_embeddings(), "weight", None)
        width = weight.shape[-1] if isinstance(weight, torch.Tensor) else None
        if (vocabulary is not None and width and len(vocabulary) >= MIN_TOKENS_PER_WIDTH * width and loss == "kl"
                and not self.head_params):
            self.sub = (_sub_head(model, vocabulary), _sub_head(teacher, vocabulary))
            if None in self.sub:
                self.sub = None
            self.sub_chunk = chunk if chunk is not None else head_chunk(len(vocabulary))

    def __call__(self, hidden: torch.Tensor, teacher_hidden: torch.Tensor | None, batch: Batch) -> torch.Tensor:
        """The mean loss over the batch's positions, differentiable with respect to ``hidden`` (and the
        trained weights of the head)."""
        kl_rows, target = _rows(batch, hidden)

        def run(h: torch.Tensor, params: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list]:
            sums, grads = self._sums(h, teacher_hidden, kl_rows, target, list(params), with_grad=True)
            return sums[self.loss], grads

        if not (hidden.requires_grad or self.head_params) or not torch.is_grad_enabled():
            with torch.no_grad():
                return self._sums(hidden, teacher_hidden, kl_rows, target, [], with_grad=False)[0][self.loss]
        return _ChunkedHead.apply(hidden, run, *self.head_params)

    def measure(self, hidden: torch.Tensor, teacher_hidden: torch.Tensor | None, batch: Batch
                ) -> dict[str, tuple[float, int]]:
        """``{"loss": (sum, positions), "nll": (sum, positions)}`` without gradients, for evaluation."""
        kl_rows, target = _rows(batch, hidden)
        with torch.no_grad():
            sums, counts = self._sums(hidden, teacher_hidden, kl_rows, target, [], with_grad=False, totals=True)
        return {"loss": (sums[self.loss], counts[self.loss]), "nll": (sums["ce"], counts["ce"])}

    def _sums(self, hidden: torch.Tensor, teacher_hidden: torch.Tensor | None, kl_rows: torch.Tensor,
              target: torch.Tensor, params: list[torch.Tensor], *, with_grad: bool, totals: bool = False) -> Any:
        """Per loss the mean over its positions (``totals``: the sums and the counts), and, ``with_grad``,
        the gradient of the trained loss with respect to ``hidden`` and ``params``, one chunk at a time."""
        flat = hidden.detach().reshape(-1, hidden.shape[-1])
        teacher_flat = None if teacher_hidden is None else teacher_hidden.detach().reshape(-1, flat.shape[-1])
        counts = {"kl": int(kl_rows.sum()), "ce": int((target != IGNORE).sum())}
        if counts[self.loss] == 0:
            raise CompressorError("the batch has no position to learn from (all padding, or sequences of one "
                                  "token)", "pass sequences of at least two tokens")
        sums = {"kl": torch.zeros((), dtype=torch.float64), "ce": torch.zeros((), dtype=torch.float64)}
        grad_h = torch.zeros_like(flat) if with_grad else None
        grad_p = [torch.zeros_like(p) for p in params] if with_grad else []
        T = self.temperature
        # A training step of kl over the text's tokens: small logits, so one chunk holds many more positions.
        student, teacher = self.sub if with_grad and self.sub is not None else (self.student, self.teacher)
        chunk = self.chunk if student is self.student else self.sub_chunk
        for s in range(0, flat.shape[0], chunk):
            rows = slice(s, s + chunk)
            h = flat[rows].detach().requires_grad_(with_grad)
            with torch.set_grad_enabled(with_grad):
                logits = student(h).float()
                terms = {}
                if student is self.student:  # the text's own tokens need the whole vocabulary
                    terms["ce"] = F.cross_entropy(logits, target[rows], ignore_index=IGNORE, reduction="sum")
                if teacher_flat is not None:
                    with torch.no_grad():
                        ref = F.log_softmax(teacher(teacher_flat[rows]).float() / T, -1)
                    per_row = (ref.exp() * (ref - F.log_softmax(logits / T, -1))).sum(-1)
                    terms["kl"] = (per_row * kl_rows[rows]).sum() * T ** 2
                if with_grad:
                    wrt = [h, *params]
                    got = torch.autograd.grad(terms[self.loss] / counts[self.loss], wrt, allow_unused=True)
                    grad_h[rows] = got[0]
                    for acc, g in zip(grad_p, got[1:], strict=True):
                        if g is not None:
                            acc.add_(g)
            for k, v in terms.items():
                sums[k] += v.detach().double()
        if totals:
            return {k: float(v) for k, v in sums.items()}, counts
        means = {k: (v / max(counts[k], 1)).float() for k, v in sums.items()}
        grads = [None if grad_h is None else grad_h.reshape(hidden.shape), *grad_p] if with_grad else []
        return means, grads


def text_tokens(*datas: Any) -> torch.Tensor:
    """The distinct token ids of ``datas`` (dicts with ``input_ids``, lists of them, or id tensors), sorted:
    the subset of the vocabulary a ``kl`` training step compares over (module doc)."""
    ids: list[torch.Tensor] = []
    for data in datas:
        for batch in data if isinstance(data, list) else [data]:
            found = batch.get("input_ids") if isinstance(batch, Mapping) else (tensors_of(batch) or [None])[0]
            if isinstance(found, torch.Tensor) and not found.is_floating_point():
                ids.append(found.reshape(-1).cpu())
    return torch.unique(torch.cat(ids)) if ids else torch.empty(0, dtype=torch.long)


def _sub_head(model: nn.Module | None, vocabulary: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Hidden states -> logits over ``vocabulary`` only (Gemma's soft-capping applied), or None when
    ``model``'s head is not a plain linear layer."""
    head = None if model is None else model.get_output_embeddings()
    if type(head) is not nn.Linear:
        return None
    weight = head.weight.detach()[vocabulary.to(head.weight.device)]
    bias = None if head.bias is None else head.bias.detach()[vocabulary.to(head.weight.device)]
    return logits_fn(model, lambda h: F.linear(h, weight, bias))


@torch.no_grad()
def evaluate(model: nn.Module, batches: Sequence[Batch], teacher_hidden: Sequence[torch.Tensor] | None,
             lm: LMLoss) -> dict[str, float]:
    """``val_loss`` (the training loss) and ``val_nll`` (next-token NLL of the text) per position, over
    ``batches`` (``teacher_hidden``: the teacher's :func:`head_inputs` on each, for ``kl``)."""
    total = {"loss": [0.0, 0], "nll": [0.0, 0]}
    for i, batch in enumerate(batches):
        got = lm.measure(head_inputs(model, batch), None if teacher_hidden is None else teacher_hidden[i], batch)
        for k, (s, n) in got.items():
            total[k][0] += s
            total[k][1] += n
    return {"val_loss": total["loss"][0] / max(total["loss"][1], 1),
            "val_nll": total["nll"][0] / max(total["nll"][1], 1)}


def preflight(model: nn.Module, teacher: nn.Module | None, batch: Batch, data: str) -> None:
    """Run the model and the teacher up to their heads on one sequence of ``batch``: a model that is not the
    teacher's compressed copy, or inputs it cannot take, fail here in one line."""
    one = take(batch, slice(0, 1))
    try:
        with torch.no_grad():
            h = head_inputs(model, one)
            t = None if teacher is None else head_inputs(teacher, one)
    except CompressorError:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError, KeyError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CompressorError(f"the model or the teacher cannot run on the {data} inputs ({first})",
                              "pass token sequences (input_ids) the model's tokenizer made") from None
    if teacher is not None:
        with torch.no_grad():
            vocab = (logits_fn(model)(h[0, :1]).shape[-1], logits_fn(teacher)(t[0, :1]).shape[-1])
        if t.shape != h.shape or vocab[0] != vocab[1]:
            raise CompressorError(f"the teacher's hidden states are {list(t.shape)} over {vocab[1]} tokens but the "
                                  f"model's {list(h.shape)} over {vocab[0]}: it is not the model this one was "
                                  "compressed from", "pass the original model as the teacher (--teacher)")

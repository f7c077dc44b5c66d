"""Fidelity of sequence outputs on what a user reads from them: the decoded result, not the logits.

    agreement = decoded_agreement(reference_logits, compressed_logits, decoding="ctc")
    agreement["string_agreement"]     # fraction of sequences decoded exactly as the reference decodes them

A CTC recogniser (OCR, speech) or a token classifier turns per-step scores into labels; small per-step errors
that flip an argmax become wrong characters, and one wrong character makes a wrong line. Measured on
ddddocr's recogniser (benchmarks/ocr.py), a cosine of 0.998 to the original's logits still changed 3.5% of
the decoded lines, so a cosine alone does not say whether the compressed model reads the same text.

Each argument is a list of arrays (or tensors), one per batch, scores over classes on ``class_axis``, steps
on ``time_axis``, every other axis a batch axis. The reference is the original model's own decoding (no
labels needed):

* ``decoding="ctc"``: greedy CTC (argmax per step, repeats collapsed, ``blank`` dropped), as CTC recognisers
  decode; ``char_agreement`` is 1 - edit distance / length of the reference's decoded sequences (both summed over
  sequences; at least 0).
* ``decoding="labels"``: one label per step (token classification); ``char_agreement`` is then the
  fraction of steps labelled alike, and a sequence agrees when every step does.

``step_agreement`` is the fraction of steps whose argmax is the reference's, in both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

DECODINGS = ("ctc", "labels")


def step_labels(scores: Any, class_axis: int = -1, time_axis: int = 0) -> np.ndarray:
    """The argmax labels of ``scores`` as ``(sequences, steps)``: every axis other than the class and time
    axes is a batch axis."""
    arr = np.asarray(scores.detach().cpu() if hasattr(scores, "detach") else scores)
    labels = arr.argmax(axis=class_axis)
    t = time_axis % arr.ndim
    c = class_axis % arr.ndim
    t -= t > c  # the class axis is gone
    return np.moveaxis(labels, t, -1).reshape(-1, labels.shape[t])


def ctc_greedy(labels: Sequence[int], blank: int = 0) -> list[int]:
    """Greedy CTC decoding of one sequence of per-step labels: repeats collapsed, then ``blank`` dropped."""
    out, prev = [], None
    for i in labels:
        i = int(i)
        if i != prev and i != blank:
            out.append(i)
        prev = i
    return out


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance (insertions, deletions, substitutions each cost 1)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def decoded_agreement(reference: Sequence[Any], new: Sequence[Any], *, decoding: str = "ctc", blank: int = 0,
                      class_axis: int = -1, time_axis: int = 0) -> dict[str, float]:
    """How often ``new``'s decoded sequences are ``reference``'s (see the module docstring): ``string_agreement``,
    ``char_agreement``, ``step_agreement`` and ``sequences`` (how many were compared)."""
    if decoding not in DECODINGS:
        raise ValueError(f"decoding must be one of {DECODINGS}, got {decoding!r}")
    if len(reference) != len(new):
        raise ValueError(f"{len(reference)} reference batches but {len(new)} new ones")
    same = edits = length = steps_same = steps = sequences = 0
    for ref_batch, new_batch in zip(reference, new, strict=True):
        a = step_labels(ref_batch, class_axis, time_axis)
        b = step_labels(new_batch, class_axis, time_axis)
        if a.shape != b.shape:
            raise ValueError(f"outputs of shapes {a.shape} and {b.shape} (sequences, steps) cannot be compared")
        steps_same += int((a == b).sum())
        steps += a.size
        for x, y in zip(a, b, strict=True):
            sequences += 1
            if decoding == "ctc":
                dx, dy = ctc_greedy(x, blank), ctc_greedy(y, blank)
                same += dx == dy
                edits += edit_distance(dx, dy)
                length += len(dx)
            else:
                same += bool((x == y).all())
                edits += int((x != y).sum())
                length += len(x)
    return {"string_agreement": same / max(sequences, 1),
            # Clamped: a sequence with many insertions is at most all wrong.
            "char_agreement": max(0.0, 1.0 - edits / length) if length else float(edits == 0),
            "step_agreement": steps_same / max(steps, 1), "sequences": sequences}

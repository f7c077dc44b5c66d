"""Decoded agreement of sequence outputs (compressor.data.sequence): greedy CTC and per-step labels, checked
on hand-made scores and on a tiny CTC-like model factored to rank 1."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import compressor
from compressor.data.sequence import ctc_greedy, decoded_agreement, edit_distance, step_labels

pytestmark = pytest.mark.usefixtures("one_thread")


def scores(labels: list[list[int]], classes: int) -> np.ndarray:
    """(steps, sequences, classes) scores whose argmax is ``labels[sequence][step]``."""
    return np.eye(classes, dtype=np.float32)[np.array(labels)].transpose(1, 0, 2)


def test_ctc_greedy_collapses_repeats_then_drops_blanks():
    assert ctc_greedy([0, 1, 1, 0, 1, 2, 2, 0]) == [1, 1, 2]  # a blank between two 1s keeps both
    assert ctc_greedy([3, 3, 3]) == [3]
    assert ctc_greedy([0, 0]) == []
    assert ctc_greedy([5, 1, 5], blank=5) == [1]
    assert edit_distance([1, 2, 3], [1, 3]) == 1
    assert edit_distance([], [4, 4]) == 2


def test_step_labels_reads_time_and_class_axes():
    s = scores([[1, 2, 0], [3, 3, 1]], 4)  # (3 steps, 2 sequences, 4 classes)
    assert step_labels(s).tolist() == [[1, 2, 0], [3, 3, 1]]
    assert step_labels(s.transpose(1, 0, 2), time_axis=1).tolist() == [[1, 2, 0], [3, 3, 1]]
    assert step_labels(torch.from_numpy(s.transpose(1, 2, 0)), class_axis=1, time_axis=2).tolist() == \
        [[1, 2, 0], [3, 3, 1]]


def test_decoded_agreement_counts_what_a_reader_sees():
    ref = scores([[1, 1, 0, 2], [3, 0, 3, 0]], 4)  # decodes to [1, 2] and [3, 3]
    # Sequence 0: a repeat instead of a blank decodes the same; sequence 1: one 3 became a blank.
    new = scores([[1, 1, 1, 2], [3, 0, 0, 0]], 4)
    ctc = decoded_agreement([ref], [new], decoding="ctc")
    assert ctc["string_agreement"] == 0.5
    assert ctc["char_agreement"] == pytest.approx(1 - 1 / 4)  # one deletion over 4 reference characters
    assert ctc["step_agreement"] == pytest.approx(6 / 8)
    assert ctc["sequences"] == 2
    labels = decoded_agreement([ref], [new], decoding="labels")
    assert labels["string_agreement"] == 0.0  # each sequence has a changed step
    assert labels["char_agreement"] == pytest.approx(6 / 8)
    same = decoded_agreement([ref, ref[:, :1]], [ref.copy(), ref[:, :1].copy()])
    assert same == {"string_agreement": 1.0, "char_agreement": 1.0, "step_agreement": 1.0, "sequences": 3}
    with pytest.raises(ValueError, match="decoding"):
        decoded_agreement([ref], [new], decoding="beam")
    with pytest.raises(ValueError, match="cannot be compared"):
        decoded_agreement([ref], [ref[:3]])


def test_a_factored_ctc_model_is_judged_on_its_decoded_lines():
    # A CTC-like recogniser: per step, a noisy embedding of a label (blank between characters) mapped back to
    # 12 class scores by a linear read-out. Full rank reads every line; rank 1 cannot.
    g = torch.Generator().manual_seed(0)
    classes, steps, lines, features = 12, 24, 16, 32
    embed = torch.randn(classes, features, generator=g)
    labels = torch.randint(1, classes, (lines, steps), generator=g)
    labels[:, ::2] = 0  # blanks between characters
    x = (embed[labels] + 0.1 * torch.randn(lines, steps, features, generator=g)).transpose(0, 1)  # (T, B, F)
    model = nn.Sequential(nn.Linear(features, classes))
    with torch.no_grad():
        model[0].weight.copy_(5 * torch.linalg.pinv(embed).T)
        model[0].bias.zero_()
        ref = model(x)
    assert decoded_agreement([ref], [ref.clone()])["string_agreement"] == 1.0
    small = copy.deepcopy(model)
    compressor.rewrite(small, compressor.analyze(small, rank=1))
    with torch.no_grad():
        new = small(x)
    got = decoded_agreement([ref], [new], decoding="ctc")
    assert got["step_agreement"] < 0.5
    assert got["string_agreement"] == 0.0
    assert 0.0 <= got["char_agreement"] < 0.5

"""Calibration data: the files a calibrated analysis reads its model inputs from, and how those inputs are
described in a plan. The analysis itself (whitening, statistics, sequential refits, sensitivities) is
:mod:`compressor.analysis.calibration`.

The loaders (:func:`load_calibration`) read calibration tensors from ``.pt`` (weights only), ``.npz`` and
``.safetensors`` files, or a text file tokenized with the model's tokenizer: one sentence per line, or (a
causal language model) one token stream cut into sequences.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from compressor.core.errors import CompressorError
from compressor.core.fileio import regular_file
from compressor.data.inputs import Batch, as_batches, attention_mask, take, tensors_of
from compressor.data.readers import check_tensor_sizes, load_safetensors


def describe(batches: list[Batch]) -> dict[str, Any]:
    """Count of samples and tokens, and a sha256 of the calibration data (for the plan)."""
    digest = hashlib.sha256()
    samples = tokens = 0
    for b in batches:
        for t in tensors_of(b):
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        first = tensors_of(b)[0]
        samples += first.shape[0] if first.dim() else 1
        mask = attention_mask(b)
        if mask is not None:
            tokens += int(mask.sum())
        elif not first.is_floating_point():  # token ids
            tokens += first.numel()
    return {"batches": len(batches), "samples": samples, "tokens": tokens or None,
            "sha256": digest.hexdigest()}


def load_calibration(path: str | Path, *, tokenizer=None, samples: int | None = None, batch_size: int = 32,
                     max_length: int = 128, stream: bool = False, bos: bool = False) -> list[Batch]:
    """Calibration batches from a file.

    * ``.pt`` / ``.pth`` (``torch.load(weights_only=True)``), ``.npz``, ``.safetensors``: one batch (a
      tensor, or named tensors as a dict: keyword inputs) or a list of batches (``.pt`` only);
    * with a ``tokenizer`` (Hugging Face), a text file with one sentence per line, tokenized in batches
      of ``batch_size`` (sentences sorted by length to limit padding); with ``stream`` (a causal language
      model) the whole text as one token stream cut into sequences of ``max_length`` tokens, no padding, as
      the low-rank LLM papers calibrate (``samples`` then counts sequences); with ``bos`` too, each sequence
      starts with the tokenizer's BOS token (if it puts one before a text) and ``max_length - 1`` text tokens.

    ``samples`` caps the number of samples (rows of the first dimension) used.
    """
    path = regular_file(path, "calibration file")  # a FIFO would block the read forever
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise CompressorError(f"calibration samples must be a whole number >= 1, got {samples}",
                              "pass e.g. --calibration-samples 256")
    suffix = path.suffix.lower()
    try:
        if suffix in (".pt", ".pth", ".bin"):
            data = torch.load(path, map_location="cpu", weights_only=True)
        elif suffix == ".npz":
            import numpy as np
            with np.load(path, allow_pickle=False) as z:
                data = {k: torch.from_numpy(z[k]) for k in z.files}
        elif suffix == ".safetensors":
            data = load_safetensors(path)
        elif tokenizer is not None:
            if stream:
                return _token_stream_batches(path, tokenizer, samples, batch_size, max_length, bos)
            return _text_batches(path, tokenizer, samples, batch_size, max_length)
        else:
            raise CompressorError(f"calibration file '{path}' has an unknown type '{suffix}'",
                                  "use .pt, .npz or .safetensors tensors, or a text file for a text model")
    except CompressorError:
        raise
    except Exception as err:
        raise CompressorError(f"cannot read calibration file '{path}' ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:120] if str(err) else ''})",
                              "write it with torch.save / numpy.savez / safetensors") from None
    if isinstance(data, dict) and len(data) == 1:
        data = next(iter(data.values()))  # a single named tensor: positional input
    batches = as_batches(data if isinstance(data, list) else [data])
    check_tensor_sizes(path, ((str(i), t) for i, b in enumerate(batches) for t in tensors_of(b)))
    return _cap(batches, samples)


def _cap(batches: list[Batch], samples: int | None) -> list[Batch]:
    if samples is None:
        return batches
    out, left = [], samples
    for b in batches:
        if left <= 0:
            break
        n = tensors_of(b)[0].shape[0]
        out.append(b if n <= left else take(b, slice(0, left)))
        left -= n
    return out


def _text_batches(path: Path, tokenizer, samples: int | None, batch_size: int, max_length: int
                  ) -> list[Batch]:
    try:
        lines = [s.strip() for s in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise CompressorError(f"calibration file '{path}' is not UTF-8 text",
                              "pass a text file with one sentence per line") from None
    sentences = [s for s in lines if s][:samples]
    if not sentences:
        raise CompressorError(f"calibration file '{path}' has no sentences", "put one sentence per line")
    return tokenize_batches(tokenizer, sentences, batch_size, max_length)


def _token_stream_batches(path: Path, tokenizer, samples: int | None, batch_size: int, seq_len: int,
                          bos: bool = False) -> list[Batch]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CompressorError(f"calibration file '{path}' is not UTF-8 text", "pass a UTF-8 text file") from None
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    start = _bos(tokenizer) if bos else None
    seq_len -= start is not None  # the BOS is one of the sequence's tokens
    n = len(ids) // seq_len if samples is None else min(samples, len(ids) // seq_len)
    if n < 1:
        raise CompressorError(f"calibration file '{path}' holds {len(ids)} tokens, fewer than one sequence of "
                              f"{seq_len}", "pass a longer text")
    seqs = ids[:n * seq_len].reshape(n, seq_len)
    if start is not None:
        seqs = torch.cat([torch.full((n, 1), start, dtype=seqs.dtype), seqs], 1)
    return [{"input_ids": seqs[i:i + batch_size], "attention_mask": torch.ones_like(seqs[i:i + batch_size])}
            for i in range(0, n, batch_size)]


def _bos(tokenizer) -> int | None:
    """The token the tokenizer puts before a text (Gemma's ``<bos>``), or None (SmolLM2 puts none): a model
    trained with one behaves differently without it (its first position is an attention sink)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    first = tokenizer("a")["input_ids"][:1]
    return bos if bos is not None and first == [bos] else None


def tokenize_batches(tokenizer, sentences: list[str], batch_size: int = 32, max_length: int = 128
                     ) -> list[dict[str, torch.Tensor]]:
    """Sentences tokenized in batches of similar length, so that batches carry little padding (random
    batches of docstrings were 58% padding), in a seeded random order of batches: calibration holds out its
    first batches to measure on, and in length order those would be the shortest sentences."""
    ordered = sorted(sentences, key=len)
    batches = [dict(tokenizer(ordered[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt"))
               for i in range(0, len(ordered), batch_size)]
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(0)).tolist()
    return [batches[i] for i in order]

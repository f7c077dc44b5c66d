"""The measurement cache: content fingerprints of models and data, and measured points stored by recipe key."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compressor.core.fileio import atomic_write, atomic_write_text
from compressor.search.front import Point
from compressor.search.recipes import Recipe

CACHE_VERSION = 6  # 2: calibrated embeddings are token-frequency weighted; 3: text exports have a dynamic sequence;
# 4: factored embeddings are no longer kept dense by the per-layer latency rule (low-rank recipes differ);
# 5: exported files carry no stack-trace metadata (smaller: a size limit may now admit another recipe);
# 6: calibrated int4 recipes round their weights by GPTQ


def fingerprint(obj: Any) -> str:
    """A content hash of nested tensors / arrays / dicts / lists / scalars (for cache keys)."""
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.flatten().view(torch.uint8).numpy().tobytes())
        elif isinstance(x, np.ndarray):
            h.update(f"A{x.dtype}{x.shape}".encode())
            h.update(np.ascontiguousarray(x).tobytes())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                h.update(f"K{k}".encode())
                feed(x[k])
        elif isinstance(x, list | tuple):
            h.update(f"L{len(x)}".encode())
            for v in x:
                feed(v)
        else:
            h.update(f"S{x!r}".encode())

    feed(obj)
    return h.hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> str:
    return fingerprint({**dict(model.state_dict()), "__class__": type(model).__qualname__})


class Cache:
    """Measurements as ``<dir>/<context key>/<name>.json`` beside their ``.onnx`` files; a name is the recipe
    key, plus the calibration / healing data keys for recipes that use them (so changing the healing
    options re-measures healed recipes only)."""

    def __init__(self, root: Path, context_key: str, data_keys: dict[str, str]):
        self.dir = Path(root) / context_key
        self.data_keys = data_keys

    def name(self, recipe: Recipe) -> str:
        uses_calibration = recipe.calibrated or recipe.keep_fp16
        return (recipe.key() + (f"-c{self.data_keys['calibration']}" if uses_calibration else "")
                + (f"-h{self.data_keys['heal']}" if recipe.heal_steps else ""))

    def onnx(self, recipe: Recipe) -> Path:
        return self.dir / f"{self.name(recipe)}.onnx"

    def get(self, recipe: Recipe) -> Point | None:
        path = self.dir / f"{self.name(recipe)}.json"
        if not path.is_file() or not self.onnx(recipe).is_file():
            return None
        try:
            d = json.loads(path.read_text())
            point = Point.from_dict(d["point"])
        except (ValueError, KeyError, TypeError):
            return None  # unreadable entry: measure again
        if point.recipe != recipe:
            return None
        point.cached = True
        return point

    def put(self, point: Point) -> None:
        data = {"format": "compressor-recipe-measurement", "version": CACHE_VERSION, "name": point.recipe.name,
                "point": {**point.to_dict(), "cached": False}}
        atomic_write_text(self.dir / f"{self.name(point.recipe)}.json", json.dumps(data, indent=2) + "\n")

    def store(self, recipe: Recipe, src: Path) -> Path:
        dst = self.onnx(recipe)
        atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))
        return dst

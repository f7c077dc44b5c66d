"""Output folders that load where the original loaded: ``AutoModel*.from_pretrained(out)`` and
``SentenceTransformer(out)``, after ``import compressor``.

A Hugging Face folder compressor writes says in its ``config.json`` what transformers must build before it
loads the weights, the way quantization libraries integrate with transformers::

    "quantization_config": {"quant_method": "compressor", "layers": {NAME: {"kind", "rank", "shape"}}, ...}

``import compressor`` registers a transformers quantizer for ``quant_method`` "compressor" (:func:`register`),
which swaps those layers for their factored form on the meta device before the weights load, so every
tensor of ``model.safetensors`` finds its place. Registration is lazy (:func:`install`): compressor never
imports transformers itself; the quantizer is registered the moment transformers loads its quantizer
registry, or at once when it has already.

Without the registration transformers only warns about an unknown ``quant_method`` and would fill the
factored layers with random weights. So ``config.json`` also holds ``transformers_weights`` (the file
transformers reads the weights from) set to :data:`NEEDS_COMPRESSOR`, which is no file name: transformers
then raises, quoting it; the registered quantizer removes it before transformers looks for the weights.
transformers drops the key from the configs it saves, so a folder re-saved by ``save_pretrained`` lacks it:
there the quantizer saves an empty ``NAME.weight`` beside each factored layer's factors, which transformers
alone refuses (a size mismatch) and the quantizer ignores.

sentence-transformers folders keep their modules (``modules.json``, ``1_Pooling/``, ...) beside the
factored transformer (:func:`copy_sentence_transformers`), and :func:`pooling` reads how they pool.
"""

from __future__ import annotations

import importlib.machinery
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: `import compressor` runs this module, and should stay cheap
    from pathlib import Path

QUANT_METHOD = "compressor"
DROPIN_VERSION = 1
# transformers raises when a config's weights file is not a safetensors name, quoting it: this is that message.
NEEDS_COMPRESSOR = ("compressor low-rank folder: run `import compressor` (pip install compressor) before "
                    "from_pretrained; without it the factored layers would load as random weights")
REGISTRY = "transformers.quantizers.auto"  # where transformers keeps its quantizers by quant_method
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
ST_MODULE_FILE_BYTES = 1 << 30  # a module's files beside the transformer (a Dense layer's weights at most)
REPAIR = "repair or re-download the model folder"


# ------------------------------------------------------------------------------------------ writing


def quantization_config(table: dict[str, dict]) -> dict[str, Any]:
    """The ``quantization_config`` entry of ``config.json`` for the factored layers in ``table``
    (:func:`compressor.core.rewrite.factored_table`)."""
    from compressor.core.version import __version__

    return {"quant_method": QUANT_METHOD, "version": DROPIN_VERSION, "compressor_version": __version__,
            "layers": table}


def mark_hf_config(folder: Path, table: dict[str, dict]) -> None:
    """Add to ``folder/config.json`` what transformers needs to load the factored layers in ``table``, and
    what makes it refuse the folder without compressor (see the module docstring)."""
    import json

    from compressor.core.fileio import atomic_write_text

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config.pop("quantization_config", None)
    if table:
        config["quantization_config"] = quantization_config(table)
        config["transformers_weights"] = NEEDS_COMPRESSOR
    else:
        config.pop("transformers_weights", None)
    atomic_write_text(folder / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_sentence_transformers(source: Path, folder: Path) -> list[str]:
    """Copy a sentence-transformers folder's own files (``modules.json``, its configs, and the folders of
    the modules after the transformer, e.g. ``1_Pooling/``) from ``source`` into ``folder``; returns what
    was copied (nothing for other folders). Only regular files inside ``source`` are copied, and nothing is
    run: a module's class is loaded by sentence-transformers, when the user loads the folder."""
    import shutil

    from compressor.core.errors import CompressorError
    from compressor.core.fileio import file_in_folder

    modules = st_modules(source)
    if modules is None:
        return []
    copied = []
    for name in ST_FILES:
        if (source / name).exists():
            shutil.copyfile(file_in_folder(source, source / name, "sentence-transformers file"), folder / name)
            copied.append(name)
    for module in modules:
        sub = module.get("path") or ""
        if not sub or not (source / sub).is_dir():  # "": the transformer itself; Normalize has no folder
            continue
        files = sorted(f for f in (source / sub).rglob("*") if not f.is_dir())
        if sum(file_in_folder(source, f, "sentence-transformers module file").stat().st_size
               for f in files) > ST_MODULE_FILE_BYTES:
            raise CompressorError(f"the sentence-transformers module folder '{source / sub}' holds more than "
                                  f"{ST_MODULE_FILE_BYTES >> 30} GiB", REPAIR)
        for f in files:
            target = folder / f.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
            copied.append(str(f.relative_to(source)))
    return copied


# ------------------------------------------------------------------------------------------ reading


def st_modules(folder: Path) -> list[dict] | None:
    """The module list of a sentence-transformers folder (``modules.json``), or None for other folders.
    A module path leading out of the folder is refused."""
    from pathlib import Path

    from compressor.core.errors import CompressorError
    from compressor.core.statefile import read_json

    if not (folder / "modules.json").is_file():
        return None
    modules = read_json(folder / "modules.json", "sentence-transformers module list", REPAIR, kind=list)
    if not all(isinstance(m, dict) for m in modules):
        raise CompressorError(f"'{folder / 'modules.json'}' is not a module list", REPAIR)
    for m in modules:
        sub = m.get("path") or ""
        if not isinstance(sub, str) or Path(sub).is_absolute() or ".." in Path(sub).parts:
            raise CompressorError(f"'{folder / 'modules.json'}' names a module path {sub!r} outside the folder",
                                  REPAIR)
    return modules


def pooling(folder: Path) -> dict[str, Any] | None:
    """How a sentence-transformers folder turns token outputs into its sentence embedding:
    ``{"mode": "mean" | "cls" | "max", "normalize": bool}``, or None when the folder does not say (not a
    sentence-transformers folder), or pools in a way compressor does not compute (modules other than the
    transformer, Pooling and Normalize, such as a Dense layer: the token outputs are compared then)."""
    from compressor.core.statefile import read_json
    from compressor.data.inputs import POOLINGS

    modules = st_modules(folder)
    if not modules:
        return None
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    if kinds[:2] != ["Transformer", "Pooling"] or any(k != "Normalize" for k in kinds[2:]):
        return None
    path = folder / (modules[1].get("path") or "") / "config.json"
    if not path.is_file():  # sentence-transformers would not load it either; the token outputs count then
        return None
    config = read_json(path, "pooling config", REPAIR)
    mode = config.get("pooling_mode")  # sentence-transformers 5+ names it; older files set one flag
    if mode is None:
        on = [m for m in ("cls", "mean", "max", "mean_sqrt_len", "weightedmean", "lasttoken")
              if config.get(f"pooling_mode_{m}_token" if m == "cls" else f"pooling_mode_{m}_tokens")]
        mode = on[0] if len(on) == 1 else None
    if mode not in POOLINGS or config.get("include_prompt") is False:
        return None
    return {"mode": mode, "normalize": "Normalize" in kinds[2:]}


# ------------------------------------------------------------------------------ the transformers side


def install() -> None:
    """Register compressor's quantizer with transformers: now if transformers has loaded its quantizer
    registry, else the moment it does (a finder on ``sys.meta_path`` that acts on that one module)."""
    if REGISTRY in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


class _RegisterOnImport:
    """A finder on ``sys.meta_path`` (the protocol needs only ``find_spec``; importlib.abc is not imported, to
    keep ``import compressor`` cheap) that finds nothing itself: when transformers imports its quantizer
    registry, it lets the usual finder load it and registers compressor's quantizer right after the module
    has run."""

    def find_spec(self, name, path, target=None):
        if name != REGISTRY:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        run = spec.loader.exec_module

        def run_then_register(module) -> None:
            run(module)
            register()

        spec.loader.exec_module = run_then_register
        return spec


def register() -> None:
    """Register the ``compressor`` quantization config and quantizer with transformers (once)."""
    from transformers.quantizers import auto

    if QUANT_METHOD in auto.AUTO_QUANTIZER_MAPPING or not hasattr(auto, "register_quantizer"):
        return  # registered already, or a transformers without custom quantizers: nothing to register
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class CompressorConfig(QuantizationConfigMixin):
        """compressor's factored layers (``layers``: name -> kind, rank, weight shape) as a transformers
        quantization config; it round-trips through ``save_pretrained``."""

        def __init__(self, layers: dict[str, dict] | None = None, version: int = DROPIN_VERSION,
                     compressor_version: str | None = None, **kwargs: Any) -> None:
            self.quant_method = QUANT_METHOD
            self.version = version
            self.compressor_version = compressor_version
            self.layers = dict(layers or {})

    class CompressorQuantizer(HfQuantizer):
        """Builds compressor's factored layers before transformers loads a folder's weights into them."""

        requires_calibration = True  # only folders compressor wrote: there is nothing to do to dense weights

        def validate_environment(self, *args: Any, **kwargs: Any) -> None:
            version = getattr(self.quantization_config, "version", DROPIN_VERSION)
            if version != DROPIN_VERSION:
                raise ValueError(f"this folder was written by compressor in layout version {version}; this "
                                 f"compressor reads version {DROPIN_VERSION}: install the compressor it names")

        def update_attn_implementation(self, config):
            # The first hook that sees the config before transformers looks for the weights file: the
            # stand-in that makes compressor-less loads fail has done its work.
            if getattr(config, "transformers_weights", None) == NEEDS_COMPRESSOR:
                del config.transformers_weights
            return config

        def _process_model_before_weight_loading(self, model, **kwargs: Any):
            import re

            from compressor.core.rewrite import build_from_table

            layers = self.quantization_config.layers
            # The stand-ins save_pretrained writes (get_state_dict_and_metadata) have no place here: not an error.
            model._keys_to_ignore_on_load_unexpected = {*(model._keys_to_ignore_on_load_unexpected or ()),
                                                        *(re.escape(f"{name}.weight") + "$" for name in layers)}
            return build_from_table(model, layers)

        def get_state_dict_and_metadata(self, model):
            # transformers drops transformers_weights from every config it saves, so a folder re-saved by
            # save_pretrained would load WITHOUT compressor with its factored layers at random. An empty
            # NAME.weight per factored layer makes that load fail instead (transformers raises on a size
            # mismatch); with compressor's quantizer they are ignored.
            import torch

            state = model.state_dict()
            state.update({f"{name}.weight": torch.empty(0) for name in self.quantization_config.layers})
            return state, {}

        def _process_model_after_weight_loading(self, model, **kwargs: Any):
            return model  # the factors are ordinary Linear/Conv/Embedding weights: nothing to convert

        def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return True

    auto.register_quantization_config(QUANT_METHOD)(CompressorConfig)
    auto.register_quantizer(QUANT_METHOD)(CompressorQuantizer)

"""Loading Hugging Face folders and GGUF files, without running a folder's own code (``auto_map`` is refused
whatever the flags; ``trust_pickle`` is pickle trust, not remote-code trust).

A folder whose weights miss or add keys is refused (transformers would only warn and fill in random weights), as
is a config.json describing a model far bigger than its weights files. A GGUF file (llama.cpp's format, which
carries no code) is dequantized to a plain float32 Hugging Face model with its tokenizer.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.core.errors import CompressorError
from compressor.core.fileio import regular_file
from compressor.data.readers import check_tensor_sizes
from compressor.formats.detect import check_folder
from compressor.formats.loaded import Loaded
from compressor.formats.pickles import TRUST_FIX
from compressor.formats.torch_files import assign_weights

REMOTE_CODE_FIX = ("it cannot be loaded without running that code, which compressor never does; "
                   "load it in Python yourself (trust_remote_code=True) and save a torch model or state_dict")


def load_hf(path: Path, trust_pickle: bool, device) -> Loaded:
    check_folder(path)
    config = hf_config(path)
    if not any(path.glob("*.safetensors")) and not trust_pickle:
        raise CompressorError(f"folder '{path}' has config.json but no *.safetensors weights",
                              "convert pickle weights (pytorch_model.bin) to safetensors, or " + TRUST_FIX)
    transformers = hf_module()
    cls = hf_class(config, transformers)
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()  # its load report is ours to give, in one line
    try:  # trust_remote_code=False: never import the folder's code, never ask on stdin
        _check_config_size(path, cls, transformers, trust_pickle)
        model, info = cls.from_pretrained(path, local_files_only=True, trust_remote_code=False,
                                          use_safetensors=None if trust_pickle else True,
                                          output_loading_info=True)
    except CompressorError:
        raise
    except Exception as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CompressorError(f"could not load the Hugging Face model in '{path}' ({first})",
                              "check that the folder is complete (config.json + weights)") from None
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    problems = loading_problems(info)
    if problems:
        raise CompressorError(f"the weights in '{path}' do not fit its config.json ({type(model).__name__}): "
                              + "; ".join(problems), "repair or re-download the model folder")
    check_tensor_sizes(path, model.state_dict(keep_vars=True).items())
    if device is not None:
        model.to(device)
    return Loaded(model, "hf-folder", path, tokenizer=hf_tokenizer(path),
                  meta={"hf_config": config, "hf_class": type(model).__name__, "needs_trust_pickle": False})


def loading_problems(info: dict[str, Any]) -> list[str]:
    """What transformers' ``output_loading_info`` says went wrong, one item per kind (missing, unexpected,
    wrong shape), or nothing. transformers only warns and initialises missing weights at random: the model
    would not be the file's."""
    return [f"{label} {len(keys)} ({', '.join(sorted(keys)[:3])}{', ...' if len(keys) > 3 else ''})"
            for label, keys in (("missing", info.get("missing_keys") or ()),
                                ("unexpected", info.get("unexpected_keys") or ()),
                                ("wrong shape", [str(k[0]) if isinstance(k, tuple) else str(k)
                                                 for k in info.get("mismatched_keys") or ()]))
            if keys]


def load_gguf(path: Path, device) -> Loaded:
    """A GGUF file (llama.cpp's format: config, tokenizer and weights, often quantized, and no code) as a
    plain float32 Hugging Face model: transformers reads and dequantizes it (``gguf_file=``), then the
    weights go into a model built from the same config without its ``quantization_config``, which
    transformers would otherwise keep (and ``save_pretrained`` refuse), so the model is saved and exported
    like any Hugging Face model."""
    transformers = hf_module()
    if not transformers.utils.is_gguf_available():
        raise CompressorError(f"reading the GGUF file '{path}' needs the gguf package", "pip install gguf")
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    # transformers takes a folder and a file name in it; the file itself was checked by detect_format.
    where = dict(pretrained_model_name_or_path=str(path.parent), gguf_file=path.name, local_files_only=True,
                 trust_remote_code=False)
    try:
        with _gguf_bar_off():
            quantized, info = transformers.AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32,
                                                                                output_loading_info=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CompressorError(f"could not load the GGUF file '{path}' ({first})",
                              "pass a GGUF file of a causal language model that transformers supports, "
                              "or convert it to a Hugging Face folder") from None
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    problems = loading_problems(info)
    if problems:
        raise CompressorError(f"the tensors in '{path}' do not fit the model its metadata describes "
                              f"({type(quantized).__name__}): " + "; ".join(problems),
                              "repair or re-download the GGUF file")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(**where)
    except Exception:  # a GGUF file need not carry a tokenizer (then no example inputs either)
        tokenizer = None
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(quantized).__name__]  # as save_pretrained writes it; the GGUF names none
    with parameters_on_meta():  # no random initialisation: every weight comes from the file
        model = type(quantized)._from_config(config)
    assign_weights(model, quantized.state_dict(), f"the model in '{path}'")
    del quantized
    if device is not None:
        model.to(device)
    return Loaded(model, "gguf", path, tokenizer=tokenizer,
                  meta={"hf_config": config.to_dict(), "hf_class": type(model).__name__, "needs_trust_pickle": False})


@contextlib.contextmanager
def _gguf_bar_off() -> Iterator[None]:
    """transformers' GGUF reader draws its own progress bar whatever its logging settings (tqdm reads
    TQDM_DISABLE only at import): switched off for the block, as --quiet must mean quiet."""
    module = sys.modules.get("transformers.modeling_gguf_pytorch_utils") or importlib.import_module(
        "transformers.modeling_gguf_pytorch_utils")
    bar = getattr(module, "tqdm", None)
    if bar is None:
        yield
        return
    module.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        module.tqdm = bar


def _check_config_size(path: Path, cls, transformers, trust_pickle: bool) -> None:
    """Refuse a config.json describing a model far bigger than the folder's weights files: transformers
    would allocate (and randomly initialise) every weight the files lack before anyone could check."""
    weights = sum(f.stat().st_size for f in path.iterdir() if f.is_file()
                  and (f.suffix == ".safetensors" or (trust_pickle and f.suffix in (".bin", ".pt", ".pth"))))
    skeleton = hf_skeleton(path, cls)
    params = {id(t): t.numel() * t.element_size() for t in skeleton.state_dict(keep_vars=True).values()}
    needed = sum(params.values())
    if needed > 4 * weights + (1 << 20):  # 4x: fp16 files of an fp32 model, with room to spare
        raise CompressorError(f"'{path / 'config.json'}' describes a model of {needed:,} bytes, but its "
                              f"weights files hold only {weights:,} bytes",
                              "repair or re-download the model folder")


def hf_class(config: dict[str, Any], transformers) -> type:
    """The transformers class a folder's config names (``architectures``), or AutoModel."""
    name = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        cls = transformers.AutoModel
    return cls


def hf_skeleton(path: Path, cls: type | None = None, *, buffers: bool = False) -> nn.Module:
    """The module tree a Hugging Face folder's config describes, on the meta device (no weights, no
    memory), built as :func:`load_model` builds it; the folder's own code is never run.

    ``buffers``: only the parameters go on the meta device; buffers are computed on the CPU as the model's
    constructor computes them (a rotary embedding's ``inv_freq`` is not stored in the checkpoint), so the
    skeleton can run once its parameters are filled in."""
    transformers = hf_module()
    if cls is None:
        cls = hf_class(hf_config(path), transformers)
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    with parameters_on_meta() if buffers else torch.device("meta"):  # the module tree only: no weights
        return (transformers.AutoModel.from_config(config, trust_remote_code=False)
                if cls is transformers.AutoModel else cls._from_config(config))


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside the block is moved to the meta device at once (a new tensor's
    pages are never touched, so no memory is spent on it); buffers stay where they were made."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def read_json(path: Path, what: str) -> Any:
    """A JSON file a user handed us (a regular file, UTF-8), or one line saying what is wrong with it."""
    regular_file(path, what)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise CompressorError(f"'{path}' is not UTF-8 text", "repair or re-download the model folder") from None
    except (ValueError, RecursionError) as err:
        raise CompressorError(f"'{path}' is not valid JSON ({str(err)[:120]})",
                              "repair or re-download the model folder") from None


def hf_config(path: Path) -> dict[str, Any]:
    """A Hugging Face folder's config.json, refused when the folder asks to run its own code."""
    config = read_json(path / "config.json", "model config")
    if not isinstance(config, dict):
        raise CompressorError(f"'{path / 'config.json'}' is not a model config", "pass a model folder")
    for name in ("config.json", "tokenizer_config.json"):
        data = config if name == "config.json" else (read_json(path / name, "tokenizer config")
                                                     if (path / name).exists() else {})
        if isinstance(data, dict) and data.get("auto_map"):
            raise CompressorError(f"'{path}' needs custom Python code from the folder (auto_map in {name})",
                                  REMOTE_CODE_FIX)
    return config


def hf_module():
    try:
        import transformers
    except ImportError:
        raise CompressorError("loading a Hugging Face model folder needs transformers",
                              "pip install 'compressor[hf]'") from None
    # Its per-tensor "Loading weights" bar is noise next to ours; --quiet must mean quiet.
    transformers.utils.logging.disable_progress_bar()
    return transformers


def hf_tokenizer(path: Path):
    """The folder's tokenizer, or None when it has none."""
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return None
    try:
        return hf_module().AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception:
        return None

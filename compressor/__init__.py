"""compressor: shrink pretrained PyTorch models by low-rank factorization, and prove what it cost.

    import compressor
    plan = compressor.analyze(model, energy=0.95)   # or rank=64, rank_ratio=0.25, target=0.5
    model = compressor.rewrite(model, plan)          # swaps layers in place; returns the model
    plan.to_json("plan.json"); plan = compressor.Plan.from_json("plan.json")
    compressor.save(model, "out/", plan); model = compressor.load("out/")
    compressor.load_into("out/", MyNet())           # factored weights of a bare .safetensors into your module
    compressor.register_handler(MyLayerHandler())   # a layer kind of your own, in one call
    compressor.evaluate_perplexity("model/", "eval.txt").ppl   # a causal LM's perplexity (folder or ONNX)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from compressor.core.version import __version__
from compressor.formats.dropin import install as _install_transformers_quantizer

# Folders compressor writes load with transformers' own from_pretrained once compressor is imported
# (compressor.formats.dropin); transformers itself is not imported here, only watched for.
_install_transformers_quantizer()

# Each public name and the module that defines it, imported on first use: `python -m compressor` then
# reaches its signal handlers before torch loads (a Ctrl-C during that import is answered in one line).
_WHERE = {
    "analyze": "compressor.analysis.analyze", "find_layers": "compressor.analysis.analyze",
    "CompressorError": "compressor.core.errors", "PlanError": "compressor.core.errors",
    "LayerHandler": "compressor.core.handlers", "handler_for": "compressor.core.handlers",
    "register_handler": "compressor.core.handlers",
    "LowRankConv": "compressor.core.layers", "LowRankEmbedding": "compressor.core.layers",
    "LowRankLinear": "compressor.core.layers", "PivotedLowRankLinear": "compressor.core.layers",
    "LayerPlan": "compressor.core.plan", "Plan": "compressor.core.plan",
    "EnergyPolicy": "compressor.core.policies", "RankPolicy": "compressor.core.policies",
    "RankRatioPolicy": "compressor.core.policies", "TargetPolicy": "compressor.core.policies",
    "register_policy": "compressor.core.policies",
    "factor_module": "compressor.core.rewrite", "rewrite": "compressor.core.rewrite",
    "Loaded": "compressor.formats.load", "load": "compressor.formats.load", "load_model": "compressor.formats.load",
    "load_into": "compressor.formats.load",
    "save": "compressor.formats.save", "compress": "compressor.jobs.compress", "Options": "compressor.jobs.options",
    "perplexity": "compressor.data.perplexity", "read_corpus": "compressor.data.perplexity",
    "onnx_perplexity": "compressor.export.perplexity", "evaluate_perplexity": "compressor.jobs.perplexity",
    "HealConfig": "compressor.train.heal", "HealResult": "compressor.train.heal", "heal": "compressor.train.heal",
}
__all__ = [  # the same names as _WHERE, spelled out so that linters and editors see them
    "CompressorError",
    "EnergyPolicy",
    "HealConfig",
    "HealResult",
    "LayerHandler",
    "LayerPlan",
    "Loaded",
    "LowRankConv",
    "LowRankEmbedding",
    "LowRankLinear",
    "Options",
    "PivotedLowRankLinear",
    "Plan",
    "PlanError",
    "RankPolicy",
    "RankRatioPolicy",
    "TargetPolicy",
    "__version__",
    "analyze",
    "compress",
    "evaluate_perplexity",
    "factor_module",
    "find_layers",
    "handler_for",
    "heal",
    "load",
    "load_into",
    "load_model",
    "onnx_perplexity",
    "perplexity",
    "read_corpus",
    "register_handler",
    "register_policy",
    "rewrite",
    "save",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'compressor' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


if TYPE_CHECKING:  # what the names above are, for type checkers and editors
    from compressor.analysis.analyze import analyze, find_layers
    from compressor.core.errors import CompressorError, PlanError
    from compressor.core.handlers import LayerHandler, handler_for, register_handler
    from compressor.core.layers import LowRankConv, LowRankEmbedding, LowRankLinear, PivotedLowRankLinear
    from compressor.core.plan import LayerPlan, Plan
    from compressor.core.policies import EnergyPolicy, RankPolicy, RankRatioPolicy, TargetPolicy, register_policy
    from compressor.core.rewrite import factor_module, rewrite
    from compressor.data.perplexity import perplexity, read_corpus
    from compressor.export.perplexity import onnx_perplexity
    from compressor.formats.load import Loaded, load, load_into, load_model
    from compressor.formats.save import save
    from compressor.jobs.compress import compress
    from compressor.jobs.options import Options
    from compressor.jobs.perplexity import evaluate_perplexity
    from compressor.train.heal import HealConfig, HealResult, heal

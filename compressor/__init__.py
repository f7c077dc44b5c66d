"""compressor: shrink pretrained PyTorch models by low-rank factorization, and prove what it cost.

    import compressor
    plan = compressor.analyze(model, energy=0.95)   # or rank=64, rank_ratio=0.25, target=0.5
    model = compressor.rewrite(model, plan)          # swaps layers in place; returns the model
    plan.to_json("plan.json"); plan = compressor.Plan.from_json("plan.json")
    compressor.save(model, "out/", plan); model = compressor.load("out/")
    compressor.register_handler(MyLayerHandler())   # a layer kind of your own, in one call
"""

from compressor.analysis.analyze import analyze, find_layers
from compressor.core.errors import CompressorError, PlanError
from compressor.core.handlers import LayerHandler, handler_for, register_handler
from compressor.core.layers import LowRankConv, LowRankEmbedding, LowRankLinear
from compressor.core.plan import LayerPlan, Plan
from compressor.core.policies import EnergyPolicy, RankPolicy, RankRatioPolicy, TargetPolicy
from compressor.core.rewrite import factor_module, rewrite
from compressor.core.version import __version__
from compressor.formats.load import Loaded, load, load_model
from compressor.formats.save import save
from compressor.jobs.compress import compress
from compressor.train.heal import HealConfig, HealResult, heal

__all__ = [
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
    "Plan",
    "PlanError",
    "RankPolicy",
    "RankRatioPolicy",
    "TargetPolicy",
    "__version__",
    "analyze",
    "compress",
    "factor_module",
    "find_layers",
    "handler_for",
    "heal",
    "load",
    "load_model",
    "register_handler",
    "rewrite",
    "save",
]

"""Where compressor 0.1 kept its factored layers: folders it wrote pickle their module tree naming
``compressor.layers.LowRankLinear`` etc., so the names stay importable here. New code imports
:mod:`compressor.core.layers`."""

from compressor.core.layers import LowRankConv, LowRankEmbedding, LowRankLinear

__all__ = ["LowRankConv", "LowRankEmbedding", "LowRankLinear"]

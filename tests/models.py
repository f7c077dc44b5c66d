"""Small models built in the tests: each exercises a part of layer discovery and rewriting."""

from __future__ import annotations

import torch
from torch import nn


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 10))


class CNN(nn.Module):
    """A CNN with a depthwise-separable block (the depthwise conv is not factorizable)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pointwise = nn.Conv2d(16, 32, 1)
        self.conv1d = nn.Conv1d(32, 24, 3, padding=1, bias=False)
        self.up = nn.ConvTranspose2d(24, 8, 2, stride=2)
        self.head = nn.Linear(8 * 16 * 16, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.pointwise(self.depthwise(x)))  # (B, 32, 8, 8)
        b, _c, h, w = x.shape
        x = self.conv1d(x.flatten(2)).reshape(b, 24, h, w)
        return self.head(torch.relu(self.up(x)).flatten(1))


class EmbedMHA(nn.Module):
    """Embedding + nn.MultiheadAttention (reads out_proj.weight directly) + Linear head."""

    def __init__(self, vocab: int = 100, dim: int = 32):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.ff = nn.Linear(dim, 48)
        self.head = nn.Linear(48, 5)

    def forward(self, ids):
        x = self.emb(ids)
        x, _ = self.attn(x, x, x, need_weights=False)
        return self.head(torch.relu(self.ff(x))).mean(1)


class TiedLM(nn.Module):
    """A language-model head tied to the input embedding: one tensor, two modules."""

    def __init__(self, vocab: int = 120, dim: int = 24):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.emb.weight

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.hidden(self.emb(ids))))


def example_input(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if name == "mlp":
        return torch.randn(4, 32, generator=g)
    if name == "cnn":
        return torch.randn(2, 3, 8, 8, generator=g)
    return torch.randint(1, 100, (3, 7), generator=g)


MODELS = {"mlp": mlp, "cnn": CNN, "embed_mha": EmbedMHA, "tied": TiedLM}

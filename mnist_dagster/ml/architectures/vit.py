"""A small Vision Transformer for 28x28 digits: patches, a class token, pre-norm encoder blocks.

The attention is written out (linear q/k/v, softmax(q k^T / sqrt(d)) v) rather than taken from
`nn.MultiheadAttention`/`nn.TransformerEncoderLayer`, whose inference fast paths are a risk for
ONNX export; every op here exports at opset 17 (`dynamo=False`) and runs in onnxruntime.

Recommended: hidden 64, depth 6, heads 4, patch_size 7 (16 patches), dropout 0.1 -> 205,962 parameters,
about 3x the default CNN's training time per epoch on CPU. patch_size 4 (49 patches) has the same
parameter count but costs about 4x more per epoch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mnist_dagster.digits import IMAGE_SIDE, NUM_CLASSES

#: MLP width as a multiple of `hidden`.
MLP_RATIO = 2


class SelfAttention(nn.Module):
    """Multi-head self-attention over (N, T, hidden) tokens."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.attn_drop = nn.Dropout(dropout)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        weights = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        weights = self.attn_drop(weights.softmax(dim=-1))
        out = (weights @ v).transpose(1, 2).reshape(n, t, c)
        return self.proj_drop(self.proj(out))


class EncoderBlock(nn.Module):
    """Pre-norm: x + attention(LN(x)), then x + MLP(LN(x)) with a GELU MLP."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.attn = SelfAttention(hidden, heads, dropout)
        self.norm2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, MLP_RATIO * hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(MLP_RATIO * hidden, hidden),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DigitViT(nn.Module):
    """Patch embedding (conv, kernel = stride = `patch_size`), a learned class token and position
    embeddings, `depth` pre-norm encoder blocks, a final LayerNorm, and a linear head on the class token.
    """

    #: The `TrainingConfig` fields this architecture reads (saved in its checkpoint).
    PARAMS = ("hidden", "depth", "heads", "patch_size", "dropout")

    def __init__(self, hidden: int, depth: int, heads: int, patch_size: int, dropout: float) -> None:
        super().__init__()
        if patch_size < 1 or IMAGE_SIDE % patch_size:
            raise ValueError(f"patch_size must divide the image side {IMAGE_SIDE} (e.g. 4 or 7), got {patch_size}")
        if heads < 1 or hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        tokens = (IMAGE_SIDE // patch_size) ** 2
        self.patch_embed = nn.Conv2d(1, hidden, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, hidden))
        self.pos_drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(EncoderBlock(hidden, heads, dropout) for _ in range(depth)))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, NUM_CLASSES)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, T, hidden)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = self.pos_drop(torch.cat([cls, tokens], dim=1) + self.pos_embed)
        return self.head(self.norm(self.blocks(tokens))[:, 0])

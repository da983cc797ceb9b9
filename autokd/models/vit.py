"""Vision-transformer students whose token features are tappable as NCHW maps.

Distillation from a CNN teacher compares feature maps [N, C, H, W]; a ViT's features are tokens
[N, T, D] (class token, maybe a distillation or register tokens, then one token per patch).
``TokenMap`` is a module whose output is the map: prefix tokens dropped, patch tokens reshaped to
the patch grid [N, D, H/p, W/p]. Both the built-in ViT and the ``timm:`` wrapper run their final
tokens through it, and the zoo's default tap points at it (``"token_map"``), so every transform
of the search space (attention, masks, multi-scale, local, channel-wise...) applies to a ViT
student as to a CNN.

``VisionTransformer`` (``vit_compact``, ``vit_tiny`` in the zoo): pre-norm blocks (LayerNorm,
multi-head self-attention, LayerNorm, GELU MLP), a class token and learned position embeddings,
the class token's final state classified by a linear head (ViT, Dosovitskiy et al. 2021;
DeiT-Tiny's size: Touvron et al. 2021). Position embeddings are learned for the grid of
``img_size`` and interpolated (bicubic) to any other grid, so one model takes any input whose
sides are multiples of the patch size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TimmFeatures", "TokenMap", "VisionTransformer"]


class TokenMap(nn.Module):
    """[N, T, D] tokens -> [N, D, gh, gw] map of the patch tokens (the first ``prefix`` tokens,
    class / distillation / register tokens, dropped). [N, C, H, W] maps pass through (a CNN's
    features), and so does anything else; ``channels_last`` maps [N, H, W, C] are permuted."""

    def __init__(self, prefix: int = 1, channels_last: bool = False):
        super().__init__()
        self.prefix = int(prefix)
        self.channels_last = bool(channels_last)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if x.dim() == 4:
            return x.permute(0, 3, 1, 2) if self.channels_last else x
        if x.dim() != 3:
            return x
        n, t, d = x.shape
        gh, gw = grid
        if t - self.prefix != gh * gw:
            raise ValueError(
                f"TokenMap: expected {self.prefix} prefix tokens + {gh}x{gw} patch "
                f"tokens, got {t} tokens"
            )
        return x[:, self.prefix :].transpose(1, 2).reshape(n, d, gh, gw)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"ViT: expected dim divisible by heads, got dim {dim}, heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [N, heads, T, d/heads]
        return self.proj(y.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"ViT: expected {name} to be an integer >= 1, got {value!r}")
    return value


class VisionTransformer(nn.Module):
    """A plain ViT for small images; see the module docstring.

    Taps: ``token_map`` (the final tokens after the last norm, as [N, dim, H/p, W/p]),
    ``blocks.i`` (tokens [N, T, dim], not maps), ``patch_embed`` ([N, dim, H/p, W/p]).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        img_size: int = 32,
        patch_size: int = 4,
        dim: int = 192,
        depth: int = 12,
        heads: int = 3,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        self.img_size = _positive_int("img_size", img_size)
        self.patch_size = _positive_int("patch_size", patch_size)
        for name, v in (("dim", dim), ("depth", depth), ("heads", heads)):
            _positive_int(name, v)
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or mlp_ratio <= 0:
            raise ValueError(f"ViT: expected mlp_ratio > 0, got {mlp_ratio!r}")
        if img_size % patch_size:
            raise ValueError(
                f"ViT: expected img_size divisible by patch_size, got img_size "
                f"{img_size}, patch_size {patch_size}"
            )
        self.grid = img_size // patch_size
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.token_map = TokenMap(prefix=1)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self):
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # the patch embedding is a linear map of each flattened patch
        w = self.patch_embed.weight
        nn.init.trunc_normal_(w.view(w.shape[0], -1), std=0.02)
        nn.init.zeros_(self.patch_embed.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names AdamW should not decay (besides biases and norms): timm's convention."""
        return {"pos_embed", "cls_token"}

    def _pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        if (gh, gw) == (self.grid, self.grid):
            return self.pos_embed
        cls, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        d = grid.shape[-1]
        grid = grid.reshape(1, self.grid, self.grid, d).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, gh * gw, d)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            fit = max(d for d in range(1, p + 1) if math.gcd(h, w) % d == 0)
            raise ValueError(
                f"ViT: expected image sides divisible by the patch size {p}, got "
                f"{h}x{w}; build it with a patch size that divides them, e.g. "
                f"'?patch_size={fit}'"
            )
        tokens = self.patch_embed(x)  # [N, dim, H/p, W/p]
        gh, gw = tokens.shape[-2:]
        tokens = tokens.flatten(2).transpose(1, 2)  # [N, gh*gw, dim]
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        tokens = self.norm(self.blocks(tokens + self._pos_embed(gh, gw)))
        self.token_map(tokens, (gh, gw))  # the tap: the final patch tokens as a map
        return self.head(tokens[:, 0])


class TimmFeatures(nn.Module):
    """A timm model with its final features exposed as a map at ``token_map``: runs
    ``forward_features`` (tokens for ViTs, maps for CNNs), passes them through ``TokenMap``
    (a side output, for the tap) and returns ``forward_head`` of the same features."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.token_map = TokenMap(
            prefix=getattr(model, "num_prefix_tokens", 0),
            channels_last=getattr(model, "output_fmt", "NCHW") == "NHWC",
        )

    def no_weight_decay(self) -> set[str]:
        inner = getattr(self.model, "no_weight_decay", None)
        return {f"model.{n}" for n in (inner() if callable(inner) else ())}

    def _grid(self, x: torch.Tensor) -> tuple[int, int]:
        pe = getattr(self.model, "patch_embed", None)
        if pe is not None and hasattr(pe, "dynamic_feat_size"):
            return tuple(pe.dynamic_feat_size(tuple(x.shape[-2:])))
        if pe is not None and hasattr(pe, "grid_size"):
            return tuple(pe.grid_size)
        return (0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.model.forward_features(x)
        self.token_map(feats, self._grid(x))
        return self.model.forward_head(feats)

"""ViT-B/16 and ViT-L/16 exactly as BLIP builds them [models/vit.py of the official code].

Parameter names equal the official checkpoint's ``visual_encoder.*`` keys. Pre-norm blocks (LayerNorm eps 1e-6),
qkv with bias, MLP ratio 4 with GELU, cls token + learned pos-embed, final LayerNorm, no head. Output: all tokens,
cls first. Legend: B batch, N tokens (1 + (S/P)^2), C width, H heads, D head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fastblip.config import VisionConfig
from fastblip.ops.attention import attention


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N-1, C)


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, width * 3, bias=True)
        self.proj = nn.Linear(width, width)
        self.backend = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, D) each
        out_BHND = attention(q, k, v, backend=self.backend)
        return self.proj(out_BHND.transpose(1, 2).reshape(B, N, C))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample, as timm's ``drop_path`` (scale kept paths by 1/(1-p))."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, eps: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        n_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, cfg.width))
        dpr = [x.item() for x in torch.linspace(0, cfg.drop_path_rate, cfg.depth)]  # linear in depth
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.layer_norm_eps, dpr[i]) for i in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        nn.init.trunc_normal_(self.pos_embed, std=cfg.init_std)
        nn.init.trunc_normal_(self.cls_token, std=cfg.init_std)
        self.apply(lambda m: _init_weights(m, cfg.init_std))

    def set_attention_backend(self, backend: str) -> None:
        for b in self.blocks:
            b.attn.backend = backend

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, N, C) all tokens, cls first."""
        x = self.patch_embed(pixel_values)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed[:, : x.shape[1]]
        depth = len(self.blocks)
        for i, blk in enumerate(self.blocks):
            if self.cfg.grad_ckpt and self.training and i >= depth - self.cfg.ckpt_layer:
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.norm(x)


def _init_weights(m: nn.Module, std: float = 0.02) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=std)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def interpolate_pos_embed(pos_embed: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(1, 1 + n², C) -> (1, 1 + num_patches, C): cls kept, grid resized bicubic (align_corners False)."""
    n_old = pos_embed.shape[1] - 1
    if n_old == num_patches:
        return pos_embed
    old, new = int(math.isqrt(n_old)), int(math.isqrt(num_patches))
    if old * old != n_old or new * new != num_patches:
        raise ValueError(f"pos_embed of {n_old} patches cannot be interpolated to {num_patches}")
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    C = grid.shape[-1]
    grid = grid.reshape(1, old, old, C).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, C).to(pos_embed.dtype)
    return torch.cat([cls, grid], dim=1)

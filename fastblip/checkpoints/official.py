"""Official BLIP ``.pth`` files (github salesforce/BLIP): kind and config inferred from keys and shapes.

Our parameter names equal the official keys (BLIP_SPEC §6); only the queues differ in layout: the official
files store ``image_queue``/``text_queue`` feature-major (D, Q) and ``idx_queue`` as (1, Q), we store them
row-major (Q, D) and (Q,). A file written by ``fastblip.save(format="official")`` carries our config under
``"fastblip_config"`` (official loaders read only ``"model"``), so tiny/unusual configs round-trip exactly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

from fastblip.checkpoints.io import CheckpointError
from fastblip.config import ModelConfig, TextConfig, VisionConfig

CONFIG_KEY = "fastblip_config"
HEAD_DIM = 64  # every released BLIP model uses 64-dim heads (ViT-B 768/12, ViT-L 1024/16, BERT 768/12)


def split_official(obj, source: str) -> tuple[dict, dict | None]:
    """``{"model": sd, ...}`` or a bare state dict -> (state dict, fastblip config dict or None)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a state dict or {{'model': state_dict}}, got "
                              f"{type(obj).__name__}")
    cfg = obj.get(CONFIG_KEY) if isinstance(obj.get(CONFIG_KEY), Mapping) else None
    sd = obj["model"] if isinstance(obj.get("model"), Mapping) else obj
    sd = {k: v for k, v in sd.items() if k != CONFIG_KEY}
    if not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{source}: no tensors found (not a BLIP checkpoint)")
    return sd, (dict(cfg) if cfg is not None else None)


def infer_kind(keys) -> str:
    """Task kind from the official key layout (BLIP_SPEC §4, §6)."""
    keys = list(keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if any(".crossattention.self0." in k for k in keys):
        return "nlvr"
    if "idx_queue" in keys:
        return "retrieval"
    enc, dec, itm = has("text_encoder."), has("text_decoder."), has("itm_head.")
    if enc and dec and itm:
        return "pretrain"
    if enc and itm:
        return "itm"
    if enc and dec:
        return "vqa"
    if dec and has("visual_encoder."):
        return "caption"
    raise CheckpointError("cannot tell the BLIP model kind from the keys (expected visual_encoder.* with "
                          "text_encoder.* and/or text_decoder.*; first keys: " + ", ".join(keys[:3]) + ")")


def _count(keys, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    ids = {int(m.group(1)) for k in keys if (m := pat.match(k))}
    return max(ids) + 1 if ids else 0


def _need(sd: Mapping, key: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"cannot infer the config: key '{key}' is missing")
    return sd[key]


def infer_config(sd: Mapping[str, torch.Tensor], kind: str) -> ModelConfig:
    """Widths, depths, heads (width / 64), image and patch size, vocab, embed dim, queue size from shapes."""
    cls = _need(sd, "visual_encoder.cls_token")
    vw = cls.shape[-1]
    patch = _need(sd, "visual_encoder.patch_embed.proj.weight").shape[-1]
    n_pos = _need(sd, "visual_encoder.pos_embed").shape[1] - 1
    grid = math.isqrt(n_pos)
    if grid * grid != n_pos:
        raise CheckpointError(f"visual_encoder.pos_embed holds {n_pos} patch positions, not a square grid")
    vdepth = _count(sd, "visual_encoder.blocks.")
    fc1 = _need(sd, "visual_encoder.blocks.0.mlp.fc1.weight")
    # official create_vit: drop path 0.1 for ViT-L always, for ViT-B only in VQA/NLVR2 (BLIP_SPEC §1)
    dpr = 0.1 if vw >= 1024 or kind in ("vqa", "nlvr") else 0.0
    vision = VisionConfig(image_size=grid * patch, patch_size=patch, width=vw, depth=vdepth, heads=vw // HEAD_DIM,
                          mlp_ratio=fc1.shape[0] / vw, drop_path_rate=dpr)
    tp = "text_encoder." if any(k.startswith("text_encoder.") for k in sd) else "text_decoder.bert."
    we = _need(sd, tp + "embeddings.word_embeddings.weight")
    tw = we.shape[1]
    text = TextConfig(vocab_size=we.shape[0], hidden_size=tw, num_layers=_count(sd, tp + "encoder.layer."),
                      num_heads=tw // HEAD_DIM,
                      intermediate_size=_need(sd, tp + "encoder.layer.0.intermediate.dense.weight").shape[0],
                      max_position_embeddings=_need(sd, tp + "embeddings.position_embeddings.weight").shape[0],
                      num_cross_images=2 if kind == "nlvr" else 1)
    cfg = ModelConfig(kind=kind, vision=vision, text=text)
    if "vision_proj.weight" in sd:
        cfg.embed_dim = sd["vision_proj.weight"].shape[0]
    if "image_queue" in sd:
        cfg.queue_size = sd["image_queue"].shape[1]  # official (D, Q)
    if kind == "vqa":
        kv = _need(sd, "text_decoder.bert.encoder.layer.0.crossattention.self.key.weight").shape[1]
        if kv != tw:  # the answer decoder attends to the question encoder's outputs (text width)
            raise CheckpointError(f"VQA layout expects the decoder's cross-attention input width {tw} (text), "
                                  f"found {kv}")
    return cfg


def from_official(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official layout -> ours: queues (D, Q) -> (Q, D), idx_queue (1, Q) -> (Q,)."""
    out = dict(sd)
    for k in ("image_queue", "text_queue"):
        if k in out and out[k].ndim == 2:
            out[k] = out[k].t().contiguous()
    if "idx_queue" in out and out["idx_queue"].ndim == 2:
        out["idx_queue"] = out["idx_queue"].reshape(-1)
    return out


def to_official(model) -> dict:
    """``{"model": every alias written out, queues (D, Q), "fastblip_config": our config}``."""
    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    for k in ("image_queue", "text_queue"):
        if k in sd:
            sd[k] = sd[k].t().contiguous()
    if "idx_queue" in sd:
        sd["idx_queue"] = sd["idx_queue"].reshape(1, -1)
    return {"model": sd, CONFIG_KEY: model.cfg.to_dict()}

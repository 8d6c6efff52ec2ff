"""Initialising pretraining from a timm ViT and an HF BERT, as the official BLIP does (BLIP_SPEC §3).

``init_vision_from_timm``: timm's ``vit_*_patch16_*`` keys map 1:1 onto ours (``head.*`` and other
classification-only tensors dropped and reported; pos-embed interpolated to our grid).
``init_text_from_bert``: HF ``BertModel`` / ``BertForPreTraining`` weights into our MED: embeddings (word
embeddings resized 30,522 -> 30,524 for ``[DEC]``/``[ENC]``), self-attention, FFN, and the MLM head
transform when both sides have it. Dropped and reported: ``token_type_embeddings`` (BLIP's text model has no
token-type embedding; the official init from bert-base-uncased drops it too, so every BLIP text input behaves as
BERT's segment 0 *minus* that row), the pooler, NSP head. Cross-attention stays random, as in the official init.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from fastblip.checkpoints.io import CheckpointError, CheckpointNotFoundError, read_tensor_file
from fastblip.config import TextConfig

log = logging.getLogger("fastblip")

# classification / distillation parts of timm ViTs that BLIP's ViT has no place for
_TIMM_DROP = ("head.", "head_dist.", "fc_norm.", "pre_logits.", "dist_token", "attn_pool.")


def _as_state_dict(source, what: str) -> dict[str, torch.Tensor]:
    if isinstance(source, Mapping):
        sd = source.get("model", source.get("state_dict", source))
        return dict(sd)
    p = Path(source)
    if p.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (p / name).is_file():
                return read_tensor_file(p / name)
        raise CheckpointError(f"{p}: no model.safetensors or pytorch_model.bin for {what}")
    if p.is_file():
        obj = read_tensor_file(p)
        return dict(obj.get("model", obj.get("state_dict", obj))) if isinstance(obj, Mapping) else obj
    raise CheckpointNotFoundError(f"{what} source not found: {p}")


def _copy(dst: nn.Module, sd: Mapping[str, torch.Tensor], mapping: Mapping[str, str], source: str) -> list[str]:
    """Copy ``sd[src]`` into ``dst``'s ``dst_key`` for each (dst_key -> src) pair; shape mismatch = error."""
    target = dst.state_dict(keep_vars=True)
    done = []
    with torch.no_grad():
        for dk, sk in mapping.items():
            v = sd[sk]
            if tuple(v.shape) != tuple(target[dk].shape):
                raise CheckpointError(f"{source}: '{sk}' has shape {tuple(v.shape)}, '{dk}' expects "
                                      f"{tuple(target[dk].shape)}")
            target[dk].copy_(v)
            done.append(dk)
    return done


def init_vision_from_timm(vit: nn.Module, source: str | Path | Mapping, *, pretrained: bool = True) -> dict:
    """Load timm ViT weights into our ``VisionTransformer``. ``source``: a timm state dict, a file holding one,
    or a timm model name (created with ``pretrained=True``: needs network or timm's cache).

    Returns ``{"loaded": [keys], "dropped": [source keys], "interpolated": bool, "missing": [keys]}``."""
    from fastblip.models.vit import interpolate_pos_embed

    if isinstance(source, str) and not Path(source).exists() and not source.endswith((".pth", ".bin",
                                                                                       ".safetensors")):
        import timm

        try:
            sd = timm.create_model(source, pretrained=pretrained, num_classes=0).state_dict()
        except (OSError, RuntimeError, ValueError) as e:  # offline download failure, unknown model name
            raise CheckpointError(f"cannot create timm model '{source}' with pretrained weights: "
                                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        name = f"timm:{source}"
    else:
        sd, name = _as_state_dict(source, "timm ViT"), str(source) if not isinstance(source, Mapping) else "dict"
    target = vit.state_dict()
    mapping, dropped = {}, []
    sd = dict(sd)
    interpolated = False
    if "pos_embed" in sd and "pos_embed" in target and sd["pos_embed"].shape[1] != target["pos_embed"].shape[1]:
        try:
            sd["pos_embed"] = interpolate_pos_embed(sd["pos_embed"], target["pos_embed"].shape[1] - 1)
        except ValueError as e:
            raise CheckpointError(f"{name}: pos_embed: {e}") from None
        interpolated = True
    for k in sd:
        if k in target:
            mapping[k] = k
        elif k.startswith(_TIMM_DROP) or k.endswith("position_ids"):
            dropped.append(k)
        else:
            raise CheckpointError(f"{name}: unknown timm ViT key '{k}' (not in BLIP's ViT)")
    loaded = _copy(vit, sd, mapping, name)
    missing = [k for k in target if k not in mapping]
    if missing:
        raise CheckpointError(f"{name}: missing {len(missing)} ViT tensor(s): {', '.join(missing[:8])}")
    return {"loaded": loaded, "dropped": dropped, "interpolated": interpolated, "missing": missing}


def bert_text_config(path: str | Path, vocab_size: int = 30524) -> TextConfig:
    """TextConfig from an HF BERT ``config.json`` (dir or file): heads, widths, eps, dropout as written there."""
    p = Path(path)
    p = p / "config.json" if p.is_dir() else p
    if not p.is_file():
        raise CheckpointNotFoundError(f"BERT config not found: {p}")
    c = json.loads(p.read_text())
    return TextConfig(vocab_size=vocab_size, hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
                      num_heads=c["num_attention_heads"], intermediate_size=c["intermediate_size"],
                      max_position_embeddings=c.get("max_position_embeddings", 512),
                      layer_norm_eps=c.get("layer_norm_eps", 1e-12), hidden_act=c.get("hidden_act", "gelu"),
                      hidden_dropout=c.get("hidden_dropout_prob", 0.1),
                      attention_dropout=c.get("attention_probs_dropout_prob", 0.1))


def _resize_rows(w: torch.Tensor, n: int) -> torch.Tensor:
    """Grow a (V, C) embedding (or (V,) bias) to n rows. New embedding rows = mean of the old rows: HF's
    ``resize_token_embeddings`` (``mean_resizing``, default since transformers 4.46) samples N(mean, 1e-9·Σ),
    i.e. the mean to ~1e-5; new bias entries are 0 as HF pads them."""
    if w.shape[0] >= n:
        return w[:n]
    extra = n - w.shape[0]
    fill = w.float().mean(0, keepdim=True).expand(extra, *w.shape[1:]).to(w.dtype) if w.ndim == 2 else \
        w.new_zeros(extra)
    return torch.cat([w, fill], dim=0)


def _bert_targets(module: nn.Module) -> list[tuple[str, nn.Module]]:
    from fastblip.models.med import BertLMHeadModel, BertModel

    if isinstance(module, (BertModel, BertLMHeadModel)):
        return [("", module)]
    out = [(n, getattr(module, n)) for n in ("text_encoder", "text_decoder") if hasattr(module, n)]
    if not out:
        raise TypeError(f"{type(module).__name__} has no BERT text model to initialise")
    return out


def init_text_from_bert(module: nn.Module, source: str | Path | Mapping) -> dict:
    """HF BERT weights into a MED ``BertModel`` / ``BertLMHeadModel`` or every text model of a BLIP model
    (``text_encoder``, ``text_decoder``; tied modules get the same tensors; momentum copies are refreshed).

    Returns ``{"loaded": [our keys], "dropped": [source keys], "resized": (old, new) or None,
    "random": [our keys left at their init, e.g. cross-attention]}``."""
    from fastblip.models.med import BertLMHeadModel

    name = str(source) if not isinstance(source, Mapping) else "dict"
    if not isinstance(source, Mapping) and Path(source).is_dir() and (Path(source) / "config.json").is_file():
        c = json.loads((Path(source) / "config.json").read_text())
        for m in _bert_targets(module):
            have = m[1].cfg.num_heads
            if c.get("num_attention_heads") not in (None, have):
                raise CheckpointError(f"{name}: BERT has {c['num_attention_heads']} heads, the model {have}; "
                                      "build the text config with bert_text_config()")
    raw = _as_state_dict(source, "BERT")
    sd = {k.removeprefix("bert."): v for k, v in raw.items()}
    report = {"loaded": [], "dropped": [], "resized": None, "random": []}
    used = set()
    for prefix, m in _bert_targets(module):
        is_lm = isinstance(m, BertLMHeadModel)
        bert = m.bert if is_lm else m
        target = bert.state_dict()
        mapping, src = {}, dict(sd)
        we = "embeddings.word_embeddings.weight"
        if we in src and src[we].shape[0] != target[we].shape[0]:
            report["resized"] = (src[we].shape[0], target[we].shape[0])
            src[we] = _resize_rows(src[we], target[we].shape[0])
        for k in target:
            if k in src:
                mapping[k] = k
        loaded = _copy(bert, src, mapping, name)
        used.update(mapping.values())
        pre = prefix + "." if prefix else ""
        pre_bert = pre + ("bert." if is_lm else "")
        report["loaded"] += [pre_bert + k for k in loaded]
        report["random"] += [pre_bert + k for k in target if k not in mapping]
        if is_lm:  # BertForPreTraining's MLM transform + bias (the LM decoder matrix is tied to embeddings)
            head = {k.removeprefix("cls."): v for k, v in raw.items() if k.startswith("cls.predictions.")}
            hmap = {}
            htarget = m.cls.state_dict()
            for k in htarget:
                if k in head and not k.startswith("predictions.decoder."):
                    if head[k].ndim == 1 and head[k].shape[0] != htarget[k].shape[0]:
                        head[k] = _resize_rows(head[k], htarget[k].shape[0])
                    hmap[k] = k
            report["loaded"] += [pre + "cls." + k for k in _copy(m.cls, head, hmap, name)]
            used.update("cls." + k for k in hmap)
            m.tie_weights()
    report["dropped"] = sorted(k for k in raw if k.removeprefix("bert.") not in used and k not in used
                               and not k.startswith("cls.predictions.decoder."))
    _refresh_momentum(module)
    return report


def _refresh_momentum(module: nn.Module) -> None:
    """Momentum encoders start as exact copies of the online ones (official ``copy_params``)."""
    for src, dst in (("text_encoder", "text_encoder_m"), ("visual_encoder", "visual_encoder_m")):
        if hasattr(module, dst):
            getattr(module, dst).load_state_dict(getattr(module, src).state_dict())

"""Build the recipe's model and initialise it as BLIP does (ViT from timm, text from BERT, or a checkpoint).

``init_from`` loads every tensor whose name and shape match (pos-embeds interpolated bicubically, official
(D, Q) queues transposed) and *reports* what it drops, like the official ``load_checkpoint`` but visibly.
After any initialisation the momentum encoders are copies of the online ones (official ``copy_params``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn

from fastblip.checkpoints.io import CheckpointNotFoundError, check_finite, read_tensor_file
from fastblip.train.recipe import Recipe

log = logging.getLogger("fastblip.train")


def _read_state(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        raise CheckpointNotFoundError(f"model.init_from: checkpoint not found: {p}")
    if p.is_file() and p.suffix in (".pth", ".pt", ".bin", ".safetensors"):
        # weights_only=True, as fastblip.load: a checkpoint passed as init_from cannot run code
        sd = read_tensor_file(p)
        if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
            sd = sd["model"]
        if not isinstance(sd, dict):
            from fastblip.errors import CheckpointError

            raise CheckpointError(f"model.init_from {p}: expected a state dict, got a {type(sd).__name__}")
        check_finite(sd, f"model.init_from {p}")  # a NaN would train silently into a NaN model
        return sd
    import fastblip  # a fastblip directory, an HF directory, ...: the strict loader reads the layout

    return fastblip.load(str(p)).state_dict()


def summarize_keys(keys: list[str], limit: int = 6) -> str:
    """``"text_decoder.* (61), temp (1)"``: dropped/missing keys grouped by their first module, for one log line
    (a task model built from a pretraining checkpoint drops the whole decoder: 60+ keys)."""
    groups: dict[str, int] = {}
    for k in keys:
        head = k.split(" ", 1)[0]
        head = head.split(".", 1)[0] + (".*" if "." in head else "")
        groups[head] = groups.get(head, 0) + 1
    items = [f"{g} ({n})" for g, n in groups.items()]
    return ", ".join(items[:limit]) + (f", ... {len(items) - limit} more groups" if len(items) > limit else "")


def load_matching(model: nn.Module, state: dict) -> dict:
    """Copy the tensors of ``state`` that fit ``model``; returns {"loaded", "dropped", "missing"} key lists."""
    from fastblip.models.vit import interpolate_pos_embed

    own = model.state_dict()
    loaded, dropped = [], []
    fixed = {}
    for k, v in state.items():
        if k not in own or not isinstance(v, torch.Tensor):
            dropped.append(f"{k} (not in model)")
            continue
        tgt = own[k]
        if k.endswith("pos_embed") and v.shape != tgt.shape and v.dim() == 3:
            v = interpolate_pos_embed(v, tgt.shape[1] - 1)
        if k in ("image_queue", "text_queue") and v.dim() == 2 and v.shape == tgt.shape[::-1]:
            v = v.t().contiguous()  # official (D, Q) -> row-major (Q, D)
        if k in ("queue_ptr", "ptr_queue") and v.numel() == tgt.numel():
            v = v.reshape(tgt.shape)
        if v.shape != tgt.shape:
            dropped.append(f"{k} (shape {tuple(v.shape)} vs {tuple(tgt.shape)})")
            continue
        fixed[k] = v
        loaded.append(k)
    model.load_state_dict(fixed, strict=False)
    missing = [k for k in own if k not in fixed]
    return {"loaded": loaded, "dropped": dropped, "missing": missing}


def report_init_from(source: str, kind: str, rep: dict) -> None:
    """What ``init_from`` did, phrased as what it is. Starting a task model from another task's checkpoint
    leaves out whole modules the task has no place for (a caption model has no text encoder or ITM head: 156
    tensors of a pretraining checkpoint) and starts new ones fresh (a task head, a queue pointer): expected,
    as the official ``load_checkpoint`` does, so one line on the run's log (``fastblip.run``). Tensors present
    in both with another shape (other than the interpolated pos-embed) are a warning: the checkpoint may not be
    the model it is meant to be, and so is a checkpoint of which nothing fits."""
    from fastblip.train.progress import RUN_LOG

    unused = [k for k in rep["dropped"] if k.endswith("(not in model)")]
    misfit = [k for k in rep["dropped"] if not k.endswith("(not in model)")]
    parts = [f"init_from {source}: loaded {len(rep['loaded'])} tensors"]
    if unused:
        parts.append(f"{len(unused)} tensors of parts a {kind} model does not have, not used: "
                     f"{summarize_keys(unused)}")
    if rep["missing"]:
        parts.append(f"{len(rep['missing'])} the checkpoint does not have, initialised fresh: "
                     f"{summarize_keys(rep['missing'])}")
    logging.getLogger(RUN_LOG).info("%s", "; ".join(parts))
    if misfit:
        shown = ", ".join(misfit[:4]) + (f", ... {len(misfit) - 4} more" if len(misfit) > 4 else "")
        log.warning("init_from %s: %d tensors have another shape in the %s model and were not loaded: %s", source,
                    len(misfit), kind, shown)
    if not rep["loaded"]:
        log.warning("init_from %s: no tensor of the checkpoint fits the %s model: it trains from its random "
                    "initialisation", source, kind)


@torch.no_grad()
def copy_momentum(model: nn.Module) -> None:
    """Momentum encoders := online encoders (after loading pretrained weights into the online ones)."""
    if not hasattr(model, "visual_encoder_m"):
        return
    from fastblip.models.contrastive import momentum_pairs

    pm, po = momentum_pairs(model)
    torch._foreach_copy_(pm, [p.detach() for p in po])


def build_and_init(recipe: Recipe) -> nn.Module:
    """The recipe's model on CPU, initialised per ``model.init_vit`` / ``init_bert`` / ``init_from``."""
    from fastblip.models import build_model

    model = build_model(recipe.model_config())
    m = recipe.model
    touched = False
    if m.init_vit:
        from fastblip.checkpoints.init import init_vision_from_timm

        rep = init_vision_from_timm(model.visual_encoder, m.init_vit)
        log.info("init: ViT from %s (%d tensors; dropped %s)", m.init_vit, len(rep["loaded"]), rep["dropped"])
        touched = True
    if m.init_bert:
        from fastblip.checkpoints.init import init_text_from_bert

        rep = init_text_from_bert(model, m.init_bert)  # encoder and decoder (tied parts get the same tensors)
        log.info("init: text from %s (%d tensors; dropped %s)", m.init_bert, len(rep["loaded"]), rep["dropped"])
        touched = True
    if m.init_from:
        state = _read_state(m.init_from)
        if getattr(model, "kind", None) == "nlvr":  # single cross-attention -> self0/self1, dense0/dense1
            from fastblip.models.blip_nlvr import nlvr_init_from_pretrained

            state = nlvr_init_from_pretrained(state)
        rep = load_matching(model, state)
        report_init_from(m.init_from, getattr(model, "kind", None) or "task", rep)
        has_m = any(k.startswith("visual_encoder_m.") for k in rep["loaded"])
        touched = touched or not has_m
    if touched:
        copy_momentum(model)
    return model

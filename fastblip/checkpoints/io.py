"""Low-level checkpoint I/O shared by every format: safe reading, strict loading into a built model, the
fastblip directory format, tie groups, and released-name downloads.

Safety: ``.pth``/``.bin`` files are read with ``torch.load(weights_only=True)`` and everything else with
safetensors, so loading a checkpoint never executes pickled code.

Strictness (DESIGN §3: ``fastblip.load`` is strict): the first unknown key or wrong shape raises one
``CheckpointError`` naming it; missing tensors are listed. Tied tensors (LM head = word embeddings, the
pretraining encoder/decoder sharing) form *tie groups*: one member present in the file is enough, and every
member is the same ``Parameter`` object after loading because ties are built by the model's constructor.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from fastblip.config import FORMAT_VERSION, ModelConfig

log = logging.getLogger("fastblip")

CONFIG_NAME = "fastblip.json"
WEIGHTS_NAME = "model.safetensors"

# Tensors whose first-dim length depends on the image size: interpolated on load when it differs.
POS_EMBED_KEYS = ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed")

# The official release (github salesforce/BLIP README); all under one bucket.
_BUCKET = "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/"
RELEASED = {
    name: _BUCKET + name + ".pth"
    for name in (
        "model_base_14M", "model_base", "model_base_capfilt_large", "model_large",
        "model_base_retrieval_coco", "model_large_retrieval_coco", "model_base_retrieval_flickr",
        "model_large_retrieval_flickr", "model_base_caption_capfilt_large", "model_large_caption",
        "model_vqa", "model_base_vqa_capfilt_large", "model_base_nlvr",
    )
}


class CheckpointError(ValueError):
    """A checkpoint that does not fit: unknown key, wrong shape, missing tensors, unknown format."""


class CheckpointNotFoundError(FileNotFoundError):
    """A checkpoint path that does not exist or cannot be read."""


class CheckpointDownloadError(CheckpointError):
    """A released name / URL that cannot be downloaded (offline, blocked, HTTP error)."""


# ----------------------------------------------------------------------------- reading files


def read_tensor_file(path: Path) -> dict:
    """A safetensors file -> dict of tensors; anything else -> ``torch.load(weights_only=True)`` object."""
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: refused by torch.load(weights_only=True): {first}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------- tie groups


def tie_groups(model: nn.Module) -> list[list[str]]:
    """State-dict keys grouped by tensor identity (each group = one storage, all its aliases, in order)."""
    groups: dict[int, list[str]] = {}
    for k, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(k)
    return list(groups.values())


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """One entry per tie group (its first key), detached and contiguous: what the fastblip format stores."""
    sd = model.state_dict(keep_vars=True)
    return {g[0]: sd[g[0]].detach().contiguous() for g in tie_groups(model)}


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every alias written out (as the official files have them)."""
    return {k: v.detach() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- strict loading


def _fmt_shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def load_strict(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str) -> dict:
    """Copy ``sd`` into ``model`` with the strict rules above; pos-embeds of another grid are interpolated.

    Returns a report ``{"loaded": n, "interpolated": [keys], "ignored": [keys]}``.
    """
    from fastblip.models.vit import interpolate_pos_embed

    target = model.state_dict(keep_vars=True)
    owner = {k: i for i, g in enumerate(tie_groups(model)) for k in g}
    n_groups = len(set(owner.values()))
    ignored = [k for k in sd if k.endswith("position_ids")]  # a buffer, rebuilt by the model (BLIP_SPEC §6)
    kind = getattr(model, "kind", type(model).__name__)
    prepared: dict[str, torch.Tensor] = {}
    interpolated = []
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue
        if k not in target:
            raise CheckpointError(f"{source}: unknown key '{k}' for a '{kind}' model (no such tensor)")
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{source}: key '{k}' holds a {type(v).__name__}, not a tensor")
        want = target[k]
        if k in POS_EMBED_KEYS and v.ndim == 3 and want.ndim == 3 and v.shape[2] == want.shape[2] \
                and v.shape[1] != want.shape[1]:
            try:
                v = interpolate_pos_embed(v, want.shape[1] - 1)
            except ValueError as e:
                raise CheckpointError(f"{source}: key '{k}': {e}") from None
            interpolated.append(k)
        if tuple(v.shape) != tuple(want.shape):
            raise CheckpointError(f"{source}: key '{k}' has shape {_fmt_shape(v)}, the model expects "
                                  f"{_fmt_shape(want)}")
        prepared[k] = v
    seen: dict[int, str] = {}
    for k in prepared:
        g = owner[k]
        if g in seen and not torch.equal(prepared[seen[g]].to(prepared[k].dtype), prepared[k]):
            log.warning("%s: tied tensors '%s' and '%s' differ; using '%s'", source, seen[g], k, seen[g])
            continue
        seen.setdefault(g, k)
    if len(seen) < n_groups:
        missing = [g[0] for g in tie_groups(model) if owner[g[0]] not in seen]
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise CheckpointError(f"{source}: missing {len(missing)} tensor(s) for a '{kind}' model: {shown}")
    with torch.no_grad():
        for k in seen.values():
            target[k].copy_(prepared[k])
    return {"loaded": len(prepared), "interpolated": interpolated, "ignored": ignored}


# ----------------------------------------------------------------------------- fastblip directory format


def is_fastblip_dir(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_NAME).is_file()


def read_fastblip_config(path: Path) -> ModelConfig:
    try:
        d = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / CONFIG_NAME}: unreadable ({e})") from None
    v = d.get("format_version")
    if not isinstance(v, int):
        raise CheckpointError(f"{path / CONFIG_NAME}: no integer 'format_version'")
    if v > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {v} is newer than this fastblip ({FORMAT_VERSION}); "
                              "upgrade fastblip")
    return ModelConfig.from_dict(d)


def save_fastblip_dir(model: nn.Module, path: Path) -> Path:
    """``fastblip.json`` + ``model.safetensors`` (tied tensors once) + tokenizer files."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.cpu() for k, v in unique_state_dict(model).items()}
    tmp = path / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "kind": model.cfg.kind})
    tmp.replace(path / WEIGHTS_NAME)  # atomic: a reader never sees half a file
    (path / CONFIG_NAME).write_text(model.cfg.to_json())
    model.tokenizer.save(path)
    return path


# ----------------------------------------------------------------------------- released names / URLs


def is_remote(src: str) -> bool:
    s = src.removesuffix(".pth")
    return src.startswith(("http://", "https://")) or (s in RELEASED and not Path(src).exists())


def download(src: str) -> dict:
    """Released name or URL -> loaded object (cached under torch.hub's dir); offline -> one clear error."""
    import http.client
    import urllib.error

    url = src if src.startswith(("http://", "https://")) else RELEASED[src.removesuffix(".pth")]
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True, progress=False)
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise CheckpointDownloadError(
            f"cannot download '{src}' from {url} (offline or blocked: {reason}); download it elsewhere and pass "
            f"the file path, or place it in {torch.hub.get_dir()}/checkpoints/") from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{url}: refused by torch.load(weights_only=True): {e}") from None

"""Checkpoint interop: ``load`` (format detected), ``save`` (fastblip | official | hf), ``convert``.

Formats (DESIGN §3):
- fastblip dir: ``fastblip.json`` (config + ``format_version``), ``model.safetensors`` (tied tensors once),
  tokenizer files.
- official BLIP ``.pth``: ``{"model": sd}`` or a bare state dict, kind and config inferred from keys/shapes
  (``official.py``), or our config from its ``"fastblip_config"`` key when present.
- HF transformers ``save_pretrained`` dir of BlipForConditionalGeneration / BlipForImageTextRetrieval /
  BlipForQuestionAnswering (``hf.py``).
- a fastblip training checkpoint (``train.out_dir/checkpoints/step-*.pt``: ``model`` in fastblip layout, the
  config in its resume ``fingerprint``); a finished run also exports ``train.out_dir/model`` (a fastblip dir).
- a released name (``"model_base_capfilt_large"``) or URL: downloaded and cached by torch.hub when online.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch

from fastblip.checkpoints import hf, official
from fastblip.checkpoints.io import (
    CheckpointDownloadError,
    CheckpointError,
    CheckpointNotFoundError,
    config_from_dict,
    download,
    is_fastblip_dir,
    is_remote,
    load_strict,
    read_fastblip_config,
    read_tensor_file,
    save_fastblip_dir,
    write_dir_atomic,
)
from fastblip.config import ModelConfig, check_device
from fastblip.errors import ConfigError

__all__ = ["load", "save", "convert", "CheckpointError", "CheckpointNotFoundError", "CheckpointDownloadError"]

log = logging.getLogger("fastblip")
FORMATS = ("fastblip", "official", "hf")


def _build(cfg: ModelConfig, image_size: int | None, dtype: torch.dtype | None, source: str = "checkpoint"):
    from fastblip.models import build_model

    if image_size is not None:
        cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_size=int(image_size)))
    try:  # sizes checked before anything is allocated (a config asking for 200 TB is one line, not an OOM)
        cfg.validate(source if image_size is None else f"{source} at image size {image_size}")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    model = build_model(cfg)
    if dtype is not None:
        model.to(dtype)
    return model


def _float_dtype(sd: dict) -> torch.dtype | None:
    for v in sd.values():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.dtype
    return None


def _with_itm_temp(cfg, sd: dict) -> dict:
    """The official ``BLIP_ITM`` class and HF's ``BlipForImageTextRetrieval`` have no ITC temperature; ours
    keeps one for ``itc_similarity`` and the retrieval layout: fill the official init value (BLIP_SPEC §1)."""
    if cfg.kind == "itm" and "temp" not in sd:
        sd = {**sd, "temp": torch.tensor(cfg.temp)}
    return sd


def _from_official_obj(obj, source: str, image_size, dtype, kind: str | None):
    sd, cfg_dict = official.split_official(obj, source)
    if cfg_dict is not None:
        cfg = config_from_dict(cfg_dict, f"{source} ('{official.CONFIG_KEY}')")
    else:
        try:
            cfg = official.infer_config(sd, kind or official.infer_kind(sd.keys()))
        except (AttributeError, IndexError, TypeError, ValueError, ZeroDivisionError) as e:
            if isinstance(e, CheckpointError):
                raise CheckpointError(f"{source}: {e}") from None
            raise CheckpointError(f"{source}: cannot infer the model config from the tensors' shapes "
                                  f"({type(e).__name__}: {e})") from None
    if kind is not None:
        cfg.kind = kind
    model = _build(cfg, image_size, dtype, source)
    report = load_strict(model, _with_itm_temp(cfg, official.from_official(sd)), source)
    return model, report


def _is_trainer_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "per_rank" in obj and "fingerprint" in obj


def _from_trainer_obj(obj: dict, source: str, image_size, dtype, kind: str | None):
    fp = obj["fingerprint"]
    cfg = config_from_dict(fp.get("model") if isinstance(fp, dict) else fp, source)  # minus backend choices
    if kind is not None:
        cfg.kind = kind
    model = _build(cfg, image_size, dtype, source)
    return model, load_strict(model, obj["model"], source)


def load(path: str | Path, *, image_size: int | None = None, device: str | torch.device | None = None,
         dtype: torch.dtype | None = None, kind: str | None = None):
    """Load any supported checkpoint into its fastblip model, in eval mode.

    ``image_size`` rebuilds the ViT for another resolution (pos-embeds interpolated bicubically, also the
    momentum ViT's); ``dtype`` casts floating tensors (default: keep fp32 / the file's dtype);
    ``kind`` overrides the inferred task layout of an official file."""
    from fastblip.data.tokenizer import load_tokenizer

    src = str(path)
    tok_dir = None
    if device is not None:
        check_device(device)  # before reading gigabytes: `device="cuda"` without a GPU is one line
    if is_remote(src):
        model, report = _from_official_obj(download(src), src, image_size, dtype, kind)
    else:
        p = Path(src).expanduser()
        if not p.exists():
            raise CheckpointNotFoundError(f"checkpoint not found: {p} (a fastblip dir, an official .pth, an HF "
                                          f"dir, or a released name such as 'model_base_capfilt_large')")
        if is_fastblip_dir(p):
            cfg = read_fastblip_config(p)
            if kind is not None:
                cfg.kind = kind
            sd = read_tensor_file(p / "model.safetensors")
            model = _build(cfg, image_size, dtype or _float_dtype(sd), str(p))
            report = load_strict(model, sd, str(p))
            tok_dir = p
        elif p.is_dir() and (p / "config.json").is_file():
            if not hf.is_hf_dir(p):
                raise CheckpointError(f"{p}: config.json is not an HF BLIP config (model_type != 'blip')")
            cfg, _ = hf.read_hf_config(p)
            sd = _with_itm_temp(cfg, hf.read_hf_weights(p))
            model = _build(cfg, image_size, dtype, str(p / "config.json"))
            report = load_strict(model, sd, str(p))
            tok_dir = p
        elif p.is_dir():
            raise CheckpointError(f"{p}: a directory without fastblip.json or config.json is no checkpoint")
        else:
            obj = read_tensor_file(p)
            if _is_trainer_checkpoint(obj):
                model, report = _from_trainer_obj(obj, str(p), image_size, dtype, kind)
            else:
                model, report = _from_official_obj(obj, str(p), image_size, dtype, kind)
    if report["interpolated"]:
        log.info("fastblip.load: interpolated %s to image size %d", ", ".join(report["interpolated"]),
                 model.cfg.vision.image_size)
    if tok_dir is not None:
        model.tokenizer = load_tokenizer(tok_dir)
    if device is not None:
        model.to(device)
    return model.eval()


def save(model, path: str | Path, format: str = "fastblip") -> Path:
    """Write ``model`` as a fastblip dir, an official ``.pth`` or an HF ``save_pretrained`` dir."""
    p = Path(path).expanduser()
    if format == "fastblip":
        return save_fastblip_dir(model, p)
    if format == "official":
        if p.is_dir():
            raise CheckpointError(f"{p}: is a directory; an official checkpoint is one .pth file")
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
        try:
            torch.save(official.to_official(model), tmp)
            tmp.replace(p)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return p
    if format == "hf":
        hf.hf_config_dict(model)  # a kind HF has no class for: refused before anything is written
        return write_dir_atomic(p, lambda tmp: hf.save_hf_dir(model, tmp))
    raise ConfigError(f"unknown checkpoint format '{format}' (valid: {', '.join(FORMATS)})")


def convert(src: str | Path, dst: str | Path, to: str = "fastblip", **load_kw) -> Path:
    """``fastblip convert SRC DST --to FORMAT``: load anything ``load`` reads, write it as ``to``."""
    if to not in FORMATS:
        raise ConfigError(f"unknown checkpoint format '{to}' (valid: {', '.join(FORMATS)})")
    return save(load(src, **load_kw), dst, format=to)

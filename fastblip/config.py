"""Typed configuration: the model config and a generic YAML-recipe loader.

Recipes only choose values; the schema is a (nested) dataclass. ``load_recipe`` reads a YAML
file, applies ``key.sub=value`` overrides and rejects unknown keys with one line naming the key.
Each verb (pretrain, finetune, capfilt, ...) defines its own recipe dataclass next to its code.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

FORMAT_VERSION = 1


class ConfigError(ValueError):
    """A bad recipe key/value or a checkpoint that does not fit the config: one clear line."""


@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6  # official ViT; HF BLIP uses 1e-5 (BLIP_SPEC §6)
    drop_path_rate: float = 0.0
    grad_ckpt: bool = False
    ckpt_layer: int = 0  # checkpoint the *last* ckpt_layer blocks (i >= depth - ckpt_layer)
    init_std: float = 0.02  # trunc-normal std of linear weights, pos_embed and cls_token at random init (timm)


@dataclass
class TextConfig:
    vocab_size: int = 30524
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    bos_token_id: int = 30522  # [DEC]
    enc_token_id: int = 30523  # [ENC]
    sep_token_id: int = 102  # [SEP], eos for generation
    cls_token_id: int = 101
    label_smoothing: float = 0.1
    initializer_range: float = 0.02  # normal std of linear/embedding weights at random init (BERT)
    # NLVR2 layout: number of images cross-attended per layer (1 everywhere else)
    num_cross_images: int = 1


@dataclass
class ModelConfig:
    """Everything needed to build a BLIP model; written into ``fastblip.json`` of a checkpoint."""

    kind: str = "pretrain"  # pretrain | retrieval | caption | vqa | nlvr | itm
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 256
    queue_size: int = 57600
    momentum: float = 0.995
    temp: float = 0.07
    negative_all_rank: bool = False
    max_text_len: int = 30
    prompt: str = "a picture of "
    first_token: str = "official"  # "official" substitutes [ENC]/[DEC]; "cls" feeds [CLS] like HF
    attention_backend: str = "auto"  # auto | reference | sdpa | flash_attn | xformers
    ops_backend: str | None = None  # None = fastest available; "reference" | "triton"
    shared_cross_kv: bool = True  # compute each image's cross-attn K/V once (DESIGN §4.3)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["format_version"] = FORMAT_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        d.pop("format_version", None)
        return from_dict(cls, d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def tiny_config(kind: str = "pretrain", **kw: Any) -> ModelConfig:
    """A tiny model for tests, CPU recipes and the demo (real 30,524-token vocabulary)."""
    cfg = ModelConfig(
        kind=kind,
        vision=VisionConfig(image_size=32, patch_size=8, width=64, depth=2, heads=4),
        text=TextConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128),
        embed_dim=32,
        queue_size=64,
    )
    return override(cfg, kw) if kw else cfg


# ----------------------------------------------------------------------------- generic loading


def _resolve_type(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union or str(origin) == "types.UnionType":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _coerce(value: Any, tp: Any, key: str) -> Any:
    tp = _resolve_type(tp)
    if value is None:
        return None
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"recipe key '{key}' must be a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes", "on"):
                    return True
                if value.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
        if origin in (list, tuple):
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, (list, tuple)):
                value = [value]
            (sub,) = typing.get_args(tp)[:1] or (Any,)
            return [_coerce(v, sub, key) for v in value]
        if origin is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            return dict(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"recipe key '{key}': cannot read {value!r} as {getattr(tp, '__name__', tp)}") from e
    return value


def from_dict(cls: type[T], d: dict, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict; unknown keys raise ``ConfigError`` naming the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    kwargs = {}
    for k, v in d.items():
        if k not in names:
            raise ConfigError(f"unknown recipe key '{prefix}{k}' (valid: {', '.join(sorted(names))})")
        kwargs[k] = _coerce(v, hints[k], prefix + k)
    return cls(**kwargs)


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[p] = nxt
        cur = nxt
    cur[parts[-1]] = value


def parse_overrides(items: list[str] | None) -> dict:
    """``["train.lr=1e-4", "data.size=384"]`` -> nested dict, values parsed as YAML scalars."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        k, v = item.split("=", 1)
        _set_dotted(out, k.strip(), yaml.safe_load(v) if v != "" else "")
    return out


def _merge(base: dict, upd: dict) -> dict:
    out = dict(base)
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def override(obj: T, updates: dict) -> T:
    """Return a copy of dataclass ``obj`` with nested ``updates`` applied (validated)."""
    return from_dict(type(obj), _merge(dataclasses.asdict(obj), updates))


def load_recipe(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Read a YAML recipe into dataclass ``cls``, then apply ``key.sub=value`` overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"recipe file not found: {p}")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {p} must be a YAML mapping")
    data = _merge(data, parse_overrides(overrides))
    return from_dict(cls, data)


def to_yaml(obj: Any) -> str:
    return yaml.safe_dump(dataclasses.asdict(obj), sort_keys=False)

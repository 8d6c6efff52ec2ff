"""Typed configuration: the model config and a generic YAML-recipe loader.

Recipes only choose values; the schema is a (nested) dataclass. ``load_recipe`` reads a YAML
file, applies ``key.sub=value`` overrides and rejects unknown keys with one line naming the key.
Each verb (pretrain, finetune, capfilt, ...) defines its own recipe dataclass next to its code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from fastblip.errors import ConfigError

T = TypeVar("T")

FORMAT_VERSION = 1
KINDS = ("pretrain", "retrieval", "itm", "caption", "vqa", "nlvr")
# Refuse a model config whose parameters alone exceed this many elements before anything is allocated: 20 G
# elements = 80 GB of fp32 weights, ~20x BLIP-large's ~0.45 G (ViT-L + BERT-base + momentum copies), more than
# one 80 GB GPU holds with its optimiser state. A typo (width=76800) or a hostile fastblip.json asking for
# 200 TB gets one line instead of an allocation that takes the machine down.
MAX_PARAMS = 20_000_000_000


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

    def validate(self, source: str = "model config") -> ModelConfig:
        """Sizes a model can be built with, checked before anything is allocated; ``ConfigError`` naming the
        field (``source`` says where the config came from: a recipe, a fastblip.json, an HF config.json)."""
        v, t = self.vision, self.text

        def bad(field_: str, why: str) -> ConfigError:
            return ConfigError(f"{source}: '{field_}' {why}")

        if self.kind not in KINDS:
            raise bad("kind", f"is {self.kind!r}, not one of {', '.join(KINDS)}")
        positive = {"vision.image_size": v.image_size, "vision.patch_size": v.patch_size, "vision.width": v.width,
                    "vision.depth": v.depth, "vision.heads": v.heads, "text.vocab_size": t.vocab_size,
                    "text.hidden_size": t.hidden_size, "text.num_layers": t.num_layers,
                    "text.num_heads": t.num_heads, "text.intermediate_size": t.intermediate_size,
                    "text.max_position_embeddings": t.max_position_embeddings, "embed_dim": self.embed_dim,
                    "queue_size": self.queue_size, "max_text_len": self.max_text_len,
                    "text.num_cross_images": t.num_cross_images}
        for k, x in positive.items():
            if isinstance(x, bool) or not isinstance(x, int) or x < 1:
                raise bad(k, f"must be a positive integer, got {x!r}")
        for k, x in {"vision.mlp_ratio": v.mlp_ratio, "temp": self.temp}.items():
            if not (isinstance(x, (int, float)) and math.isfinite(x) and x > 0):
                raise bad(k, f"must be a positive number, got {x!r}")
        for k, x in {"vision.drop_path_rate": v.drop_path_rate, "text.hidden_dropout": t.hidden_dropout,
                     "text.attention_dropout": t.attention_dropout, "text.label_smoothing": t.label_smoothing,
                     "momentum": self.momentum}.items():
            if not (isinstance(x, (int, float)) and 0.0 <= x <= 1.0):
                raise bad(k, f"must be in [0, 1], got {x!r}")
        if v.width % v.heads:
            raise bad("vision.width", f"({v.width}) is not a multiple of vision.heads ({v.heads})")
        if t.hidden_size % t.num_heads:
            raise bad("text.hidden_size", f"({t.hidden_size}) is not a multiple of text.num_heads ({t.num_heads})")
        if v.image_size < v.patch_size:
            raise bad("vision.image_size", f"({v.image_size}) is smaller than one patch ({v.patch_size})")
        if self.max_text_len > t.max_position_embeddings:
            raise bad("max_text_len", f"({self.max_text_len}) exceeds text.max_position_embeddings "
                                      f"({t.max_position_embeddings})")
        if not 0 <= v.ckpt_layer <= v.depth:
            raise bad("vision.ckpt_layer", f"must be in [0, vision.depth={v.depth}], got {v.ckpt_layer}")
        for k in ("pad_token_id", "bos_token_id", "enc_token_id", "sep_token_id", "cls_token_id"):
            if not 0 <= getattr(t, k) < t.vocab_size:
                raise bad(f"text.{k}", f"({getattr(t, k)}) is outside the vocabulary (text.vocab_size "
                                       f"{t.vocab_size})")
        n = self.param_estimate()
        if n > MAX_PARAMS:
            raise ConfigError(f"{source}: the model would have ~{n / 1e9:.0f} G parameters ({4 * n / 1e12:.1f} TB "
                              f"in fp32), over the {MAX_PARAMS / 1e9:.0f} G limit: check vision.width/depth, "
                              "text.hidden_size/num_layers/vocab_size and queue_size")
        return self

    def param_estimate(self) -> int:
        """Parameter + buffer elements of the largest layout (pretraining: encoder, decoder, momentum copies,
        queues), from the sizes alone; an upper bound good to ~10% for BLIP's layouts, used to refuse sizes
        that cannot be allocated. Python ints: no overflow however large the fields are."""
        v, t = self.vision, self.text
        grid = (v.image_size // v.patch_size) ** 2
        vit = 3 * v.patch_size**2 * v.width + (grid + 1) * v.width + v.depth * (
            4 * v.width**2 + 2 * int(v.width * v.mlp_ratio) * v.width)
        layer = 4 * t.hidden_size**2 + 2 * t.hidden_size * t.intermediate_size
        cross = 2 * t.hidden_size**2 + 2 * v.width * t.hidden_size
        bert = (t.vocab_size + t.max_position_embeddings) * t.hidden_size + t.num_layers * (
            layer + t.num_cross_images * cross)
        queues = 2 * self.queue_size * (self.embed_dim + 1)
        return 2 * vit + 3 * bert + queues  # online + momentum ViT; encoder, decoder, momentum text encoder

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
    except (TypeError, ValueError, yaml.YAMLError) as e:
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


def _yaml_reason(e: yaml.YAMLError) -> str:
    """A YAML error in one line: the problem and where (PyYAML's own message spans several lines)."""
    what = getattr(e, "problem", None) or getattr(e, "context", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{what}{where}"


def parse_overrides(items: list[str] | None) -> dict:
    """``["train.lr=1e-4", "data.size=384"]`` -> nested dict, values parsed as YAML scalars."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        k, v = item.split("=", 1)
        try:
            value = yaml.safe_load(v) if v != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': not a YAML value ({_yaml_reason(e)})") from None
        _set_dotted(out, k.strip(), value)
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
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"recipe {p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except yaml.YAMLError as e:  # syntax error, or a tag such as !!python/object that safe_load refuses
            raise ConfigError(f"recipe {p}: not valid YAML ({_yaml_reason(e)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {p} must be a YAML mapping")
    data = _merge(data, parse_overrides(overrides))
    return from_dict(cls, data)


def to_yaml(obj: Any) -> str:
    return yaml.safe_dump(dataclasses.asdict(obj), sort_keys=False)


def check_device(spec) -> None:
    """A device that exists, or one ``DeviceError`` line before any work (``--device cuda`` without a GPU is
    otherwise an error deep inside the first ``.to()``)."""
    import torch

    from fastblip.errors import DeviceError

    if spec is None or spec == "auto":
        return
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError, ValueError) as e:
        raise DeviceError(f"device {spec!r}: not a device name ({e}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {spec!r}: no CUDA GPU is available on this machine "
                              "(torch.cuda.is_available() is False); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {spec!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {spec!r}: MPS is not available on this machine; use --device cpu")

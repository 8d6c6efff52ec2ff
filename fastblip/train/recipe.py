"""The training recipe: one typed dataclass for ``fastblip pretrain`` and ``fastblip finetune``.

A YAML recipe has four sections and a task name::

    task: pretrain                      # a fastblip.tasks module (pretrain, retrieval, caption, ...)
    model: {preset: base, config: {...}, init_from: ..., init_vit: ..., init_bert: ...}
    data:  {train: [...], eval: [...], image_size: 224, batch_size: 75, ...}
    train: {epochs: 20, lr: 3e-4, ...}
    task_options: {...}                 # validated by the task module's ``Options`` dataclass

Defaults are BLIP's pretraining values (BLIP_SPEC §3); ``recipes/*.yaml`` only choose values. Every key is
checked: an unknown one raises ``ConfigError`` naming it, before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from fastblip.config import ConfigError, ModelConfig, _merge, from_dict, load_recipe, tiny_config
from fastblip.data.section import DataSection

PRESETS = ("tiny", "base", "large")
SCHEDULES = ("step", "cosine")
AMP = ("auto", "bf16", "fp32")
DISTRIBUTED = ("ddp", "fsdp2")


@dataclass
class ModelSection:
    preset: str = "base"  # tiny | base (ViT-B/16 + BERT-base) | large (ViT-L/16 + BERT-base)
    # explicit ModelConfig fields over the preset, nested as ModelConfig is: {vision: {image_size: 384}, ...}
    config: dict = field(default_factory=dict)
    init_from: str | None = None  # a checkpoint (official .pth, fastblip dir, ...): matching tensors, drops reported
    init_vit: str | None = None  # timm name or path (DeiT-base for ViT-B, vit_large_patch16_224_in21k for ViT-L)
    init_bert: str | None = None  # HF BERT dir/name (bert-base-uncased)


@dataclass
class TrainSection:
    epochs: int = 20
    max_steps: int = 0  # optimiser steps; 0 = run all epochs
    lr: float = 3e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05  # on every parameter, temp included (official)
    warmup_steps: int = 3000  # optimiser steps, linear from warmup_lr in epoch 0
    warmup_lr: float = 1e-6
    lr_decay_rate: float = 0.9  # step schedule: lr * rate ** epoch
    schedule: str = "step"  # step (pretrain) | cosine (finetune: per epoch from lr to min_lr)
    alpha: float = 0.4
    alpha_ramp_epochs: float = 2.0  # 2 pretrain, 1 retrieval
    grad_accum: int = 1
    clip_grad: float = 0.0  # max grad norm; 0 = off (official)
    amp: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    compile: str = "false"  # auto (on for CUDA) | true (the whole step, fullgraph) | false (fastblip.backends)
    grad_ckpt: bool = False
    ckpt_layer: int = 0
    seed: int = 42
    ckpt_every: int = 0  # optimiser steps; 0 = epoch end only
    keep_last: int = 3
    log_every: int = 50
    eval_every_epoch: bool = True
    eval_at_end: bool = True  # eval_every_epoch false: evaluate data.eval once after the last step (final metrics)
    tensorboard: bool = False  # TensorBoard event files in out_dir/tensorboard (fastblip.train.progress)
    out_dir: str = "runs/pretrain"
    distributed: str = "ddp"  # ddp | fsdp2


@dataclass
class Recipe:
    task: str = "pretrain"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    task_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        from fastblip.tasks import TASKS

        checks = ((self.task, TASKS, "task"), (self.model.preset, PRESETS, "model.preset"),
                  (self.train.schedule, SCHEDULES, "train.schedule"), (self.train.amp, AMP, "train.amp"),
                  (self.train.distributed, DISTRIBUTED, "train.distributed"),
                  (self.data.backend, ("pil", "dali"), "data.backend"))
        for value, valid, key in checks:
            if value not in valid:
                raise ConfigError(f"recipe key '{key}': {value!r} is not one of {', '.join(valid)}")
        if not (self.data.padding in ("auto", "longest", "max_length") or self.data.padding.startswith("buckets")):
            raise ConfigError(f"recipe key 'data.padding': {self.data.padding!r} is not auto, longest, max_length "
                              "or buckets[:a,b,...]")
        self.train.compile = str(self.train.compile).lower()
        if self.train.compile not in ("auto", "true", "false"):
            raise ConfigError(f"recipe key 'train.compile': {self.train.compile!r} is not auto, true or false")
        for key in ("train.grad_accum", "data.batch_size", "train.epochs", "data.image_size", "train.log_every",
                    "data.max_words", "data.max_length", "data.max_image_bytes", "data.max_text_bytes"):
            sec, name = key.split(".")
            if getattr(getattr(self, sec), name) < 1:
                raise ConfigError(f"recipe key '{key}' must be >= 1")
        for key in ("train.keep_last", "train.max_steps", "train.ckpt_every", "train.warmup_steps",
                    "data.num_workers", "train.ckpt_layer"):
            sec, name = key.split(".")
            if getattr(getattr(self, sec), name) < 0:
                raise ConfigError(f"recipe key '{key}' must be >= 0, got {getattr(getattr(self, sec), name)}")
        for key in ("train.lr", "train.min_lr", "train.warmup_lr", "train.weight_decay", "train.clip_grad",
                    "train.alpha", "train.alpha_ramp_epochs", "train.lr_decay_rate"):
            sec, name = key.split(".")
            v = getattr(getattr(self, sec), name)
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"recipe key '{key}' must be a finite number >= 0, got {v}")
        if not 0.0 < self.data.min_scale <= 1.0:
            raise ConfigError(f"recipe key 'data.min_scale' must be in (0, 1], got {self.data.min_scale}")
        if self.data.batches_per_epoch is not None and self.data.batches_per_epoch < 1:
            raise ConfigError(f"recipe key 'data.batches_per_epoch' must be >= 1, got {self.data.batches_per_epoch}")
        self.model_config()  # validates model.config now, not after data loading

    # ------------------------------------------------------------------ derived values
    def model_config(self) -> ModelConfig:
        """The preset's ModelConfig with ``model.config`` applied. One source of truth per setting: the image
        size, the text length and the caption prompt live in the data section (``data.image_size``,
        ``data.max_length``, ``data.prompt``) and reach the model from there; ``model.config`` naming one of
        them with another value is an error naming both keys (it used to be overwritten silently)."""
        from fastblip.tasks import get_task

        base = preset_config(self.model.preset, kind=get_task(self.task).model_kind)
        mc = self.model.config
        shared = ((("vision", "image_size"), "data.image_size", self.data.image_size),
                  (("max_text_len",), "data.max_length", self.data.max_length),
                  (("prompt",), "data.prompt", self.data.prompt or None))
        for path, data_key, value in shared:
            given = mc
            for k in path:
                given = given.get(k) if isinstance(given, dict) else None
            if given is not None and value is not None and given != value:
                raise ConfigError(f"recipe keys 'model.config.{'.'.join(path)}' ({given!r}) and '{data_key}' "
                                  f"({value!r}) disagree: set it once, as '{data_key}'")
        cfg = from_dict(ModelConfig, _merge(dataclasses.asdict(base), mc), prefix="model.config.")
        cfg.vision.image_size = self.data.image_size
        cfg.max_text_len = self.data.max_length
        if self.train.grad_ckpt:
            cfg.vision.grad_ckpt, cfg.vision.ckpt_layer = True, self.train.ckpt_layer
        if self.data.prompt:
            cfg.prompt = self.data.prompt
        return cfg.validate("recipe key 'model.config'")  # heads 0, patch 0, 200 TB: one line, nothing built

    def options(self):
        """The task's ``Options`` dataclass filled from ``task_options`` (unknown keys are errors)."""
        from fastblip.tasks import get_task

        opts_cls = get_task(self.task).options
        if opts_cls is None:
            if self.task_options:
                raise ConfigError(f"task '{self.task}' takes no task_options")
            return None
        return from_dict(opts_cls, self.task_options, prefix="task_options.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def preset_config(preset: str, kind: str = "pretrain") -> ModelConfig:
    """tiny (tests, CPU recipes), base (ViT-B/16, BERT-base), large (ViT-L/16, drop path 0.1, BERT-base)."""
    if preset == "tiny":
        return tiny_config(kind)
    cfg = ModelConfig(kind=kind)
    if preset == "large":
        cfg.vision.width, cfg.vision.depth, cfg.vision.heads = 1024, 24, 16
        cfg.vision.drop_path_rate = 0.1  # official create_vit: always 0.1 for large (BLIP_SPEC §1)
    elif preset != "base":
        raise ConfigError(f"recipe key 'model.preset': {preset!r} is not one of {', '.join(PRESETS)}")
    return cfg


def read_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Load a YAML recipe with ``key.sub=value`` overrides; validates the task options too."""
    recipe = load_recipe(Recipe, path, overrides)
    recipe.options()
    return recipe


def is_json_source(s) -> bool:
    """The source syntax of fastblip.data.readers.parse_sources, without reading anything."""
    if isinstance(s, dict):
        return True
    s = str(s)
    return s.startswith("json:") or (s.endswith(".json") and "{" not in s and "::" not in s)


def check_train_data(recipe: Recipe) -> None:
    """Data keys a training run needs, checked before the model is built: webdataset shards have no known
    length, so an epoch needs ``data.batches_per_epoch`` (else a TypeError deep in the trainer)."""
    src = recipe.data.sources(train=True)
    shards = [s for s in (src if isinstance(src, list) else [src]) if not is_json_source(s)]
    if (shards or recipe.data.resampled) and not recipe.data.batches_per_epoch:
        what = f"webdataset shards ({shards[0]!s}{', ...' if len(shards) > 1 else ''})" if shards else \
            "data.resampled=true"
        raise ConfigError(f"recipe key 'data.batches_per_epoch' is needed with {what}: their length is unknown "
                          "until read, so set the batches per epoch per rank")


def ensure_synthetic(recipe: Recipe) -> dict | None:
    """Generate the recipe's synthetic dataset if ``data.synthetic`` names one that does not exist yet."""
    spec = dict(recipe.data.synthetic)
    if not spec:
        return None
    if "out_dir" not in spec:
        raise ConfigError("recipe key 'data.synthetic' needs an 'out_dir'")
    out = Path(spec["out_dir"])
    if (out / "synth.json").is_file():
        return None
    from fastblip.data.synth import make_synthetic

    spec.setdefault("num", 512)
    spec.setdefault("noise", 0.0)
    spec.setdefault("seed", 0)
    try:
        return make_synthetic(**spec)
    except TypeError as e:
        raise ConfigError(f"recipe key 'data.synthetic': {e}") from None

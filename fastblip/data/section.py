"""The ``data:`` section of a recipe: every setting of a task's loader, in one typed place.

A task hands the section whole to ``fastblip.data.open_loader`` (no field-by-field copies); the loader reads
its sources, geometry, transforms, backend, padding and input limits from it. Image size, text length and
prompt live here only: a model.config key that disagrees with them is an error naming both
(fastblip/train/recipe.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastblip.errors import ConfigError


@dataclass
class DataSection:
    train: list[Any] = field(default_factory=list)  # shard specs / BLIP JSON paths / {json:, image_root:}
    eval: list[Any] = field(default_factory=list)
    image_size: int = 224
    batch_size: int = 75  # per rank (official pretrain config)
    num_workers: int = 4
    backend: str = "pil"  # pil | dali
    max_words: int = 30
    max_length: int = 30
    min_scale: float = 0.2  # RandomResizedCrop scale (0.2 pretrain, 0.5 finetune)
    randaugment: bool = True
    hflip: bool = True  # random horizontal flip in train transforms (off when captions say left/right)
    # auto (buckets of 8 up to max_length when compiled, else longest) | longest | max_length | buckets[:8,16,24,32]
    padding: str = "auto"
    prompt: str = ""
    resampled: bool = False  # web shards across ranks: sample with replacement, fixed batches per epoch
    batches_per_epoch: int | None = None  # needed for webdataset shards (their length is unknown)
    # generate the synthetic dataset (fastblip.data.synth.make_synthetic kwargs, incl. out_dir) when its
    # out_dir has no synth.json yet; empty = do nothing
    synthetic: dict = field(default_factory=dict)
    # input limits (fastblip/data/decode.py): an image member/file, a caption/.json member; larger ones are
    # skipped as 'too_large' without being read
    max_image_bytes: int = 64 << 20
    max_text_bytes: int = 1 << 20

    def sources(self, train: bool) -> list:
        """``train`` or ``eval`` sources; an empty list is a recipe error naming the key."""
        src = self.train if train else self.eval
        if not src:
            raise ConfigError(f"recipe key 'data.{'train' if train else 'eval'}' is empty")
        return src

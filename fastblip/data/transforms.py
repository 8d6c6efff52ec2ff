"""BLIP's image transforms (BLIP_SPEC §3) on PIL images, with an explicit per-sample RNG.

train: RandomResizedCrop(size, scale, ratio (3/4, 4/3), bicubic) → horizontal flip (p 0.5) →
RandomAugment(N=2, M=5) → to tensor → normalise.  eval: bicubic resize to size×size → normalise.

RandomAugment follows the official policy (transform/randaugment.py): N ops drawn *with replacement* from
Identity, AutoContrast, Brightness, Sharpness, Equalize, ShearX, ShearY, TranslateX, TranslateY, Rotate;
each then applied with probability 0.5 at magnitude M of 10: enhance factor (M/10)·1.8 + 0.1 (= 1.0 at
M=5, so Brightness/Sharpness are no-ops there), shear (M/10)·0.3 (= ±0.15), translate (M/10)·10 px
(= ±5 px, absolute), rotate (M/10)·30° (= ±15°), each sign random; affine warps bilinear with fill
(128, 128, 128); shear and translate are about the top-left origin, rotate about the centre, as the
OpenCV code does. Implemented with PIL (same distribution, not bit-exact with OpenCV).

Every random draw comes from the ``rng`` argument (a ``numpy.random.Generator``), so the loader seeds
it per sample from (seed, epoch, worker, index) and a resumed run augments exactly as the uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
FILL = (128, 128, 128)
MAX_LEVEL = 10.0

AUG_OPS = (
    "Identity",
    "AutoContrast",
    "Brightness",
    "Sharpness",
    "Equalize",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)


def op_args(name: str, magnitude: float, rng: np.random.Generator) -> tuple:
    """The official level→argument mapping; geometric signs drawn from ``rng``."""
    lvl = magnitude / MAX_LEVEL
    if name in ("Brightness", "Sharpness"):
        return (lvl * 1.8 + 0.1,)
    sign = -1.0 if rng.random() < 0.5 else 1.0
    if name in ("ShearX", "ShearY"):
        return (sign * lvl * 0.3,)
    if name in ("TranslateX", "TranslateY"):
        return (sign * lvl * 10.0,)
    if name == "Rotate":
        return (sign * lvl * 30.0,)
    return ()


def affine_data(name: str, arg: float, size: tuple[int, int]) -> tuple[float, ...] | None:
    """PIL ``Image.AFFINE`` data (the inverse map output→input, pixel centres at +0.5) of a geometric op, or
    None for the others. The DALI backend passes the same six numbers to ``fn.warp_affine``."""
    # PIL's AFFINE data is the inverse map output→input; OpenCV's warpAffine matrix is input→output.
    if name == "ShearX":  # x' = x + f·y
        return (1.0, -arg, 0.0, 0.0, 1.0, 0.0)
    if name == "ShearY":  # y' = y + f·x
        return (1.0, 0.0, 0.0, -arg, 1.0, 0.0)
    if name == "TranslateX":  # x' = x - offset
        return (1.0, 0.0, arg, 0.0, 1.0, 0.0)
    if name == "TranslateY":
        return (1.0, 0.0, 0.0, 0.0, 1.0, arg)
    if name == "Rotate":  # counter-clockwise about the centre, like cv2.getRotationMatrix2D; = Image.rotate
        cx, cy = size[0] / 2.0, size[1] / 2.0
        t = -math.radians(arg % 360.0)
        a, b = round(math.cos(t), 15), round(math.sin(t), 15)
        d, e = -b, a
        return (a, b, a * -cx + b * -cy + cx, d, e, d * -cx + e * -cy + cy)
    return None


def apply_op(img: Image.Image, name: str, *args: float) -> Image.Image:
    if name == "Identity":
        return img
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)  # per channel, cutoff 0: min→0, max→255
    if name == "Equalize":
        return ImageOps.equalize(img)  # per channel histogram equalisation
    if name == "Brightness":
        return ImageEnhance.Brightness(img).enhance(args[0]) if args[0] != 1.0 else img
    if name == "Sharpness":
        return ImageEnhance.Sharpness(img).enhance(args[0]) if args[0] != 1.0 else img
    if name in AUG_OPS:
        data = affine_data(name, args[0], img.size)
        return img.transform(img.size, Image.AFFINE, data, Image.BILINEAR, fillcolor=FILL)
    raise ValueError(f"unknown RandomAugment op {name!r}; ops: {', '.join(AUG_OPS)}")


class RandomAugment:
    """N ops drawn with replacement, each applied with probability 0.5 at magnitude M."""

    def __init__(self, n: int = 2, magnitude: float = 5, ops: tuple[str, ...] = AUG_OPS, prob: float = 0.5):
        for op in ops:
            if op not in AUG_OPS:
                raise ValueError(f"unknown RandomAugment op {op!r}; ops: {', '.join(AUG_OPS)}")
        self.n, self.magnitude, self.ops, self.prob = n, magnitude, tuple(ops), prob

    def sample(self, rng: np.random.Generator) -> list[tuple[str, tuple]]:
        """The ops that will be applied (after the probability draw) with their arguments."""
        chosen = [self.ops[i] for i in rng.integers(0, len(self.ops), size=self.n)]
        out = []
        for name in chosen:
            if rng.random() > self.prob:
                continue
            out.append((name, op_args(name, self.magnitude, rng)))
        return out

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> Image.Image:
        rng = rng if rng is not None else np.random.default_rng()
        for name, args in self.sample(rng):
            img = apply_op(img, name, *args)
        return img


def random_resized_crop_params(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """(top, left, h, w): torchvision's RandomResizedCrop.get_params, drawing from ``rng``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, max(h, 1), max(w, 1)


def to_tensor_normalized(img: Image.Image) -> torch.Tensor:
    """uint8 HWC RGB → float (3, H, W) normalised with BLIP's mean/std."""
    a = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return a.sub_(mean).div_(std)


@dataclass(frozen=True)
class TrainParams:
    """One sample's draw of the train transform: crop box (top, left, h, w) in the decoded image, flip, and
    the RandomAugment ops that fired, in order, with their arguments."""

    crop: tuple[int, int, int, int]
    flip: bool
    ops: tuple[tuple[str, tuple], ...]


class TrainTransform:
    def __init__(self, image_size: int, scale=(0.2, 1.0), randaugment: bool = True, hflip: bool = True):
        self.image_size = int(image_size)
        self.hflip = bool(hflip)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (3.0 / 4.0, 4.0 / 3.0)
        self.randaugment = RandomAugment(2, 5) if randaugment else None

    def params(self, width: int, height: int, rng: np.random.Generator) -> TrainParams:
        """Every random draw of one sample, in the order ``__call__`` makes them (the DALI backend draws
        them here, in the loader workers, and applies them on the GPU)."""
        crop = random_resized_crop_params(width, height, self.scale, self.ratio, rng)
        flip = bool(self.hflip and rng.random() < 0.5)
        ops = tuple(self.randaugment.sample(rng)) if self.randaugment is not None else ()
        return TrainParams(crop, flip, ops)

    def apply(self, img: Image.Image, p: TrainParams) -> torch.Tensor:
        top, left, h, w = p.crop
        s = self.image_size
        img = img.crop((left, top, left + w, top + h)).resize((s, s), Image.BICUBIC)
        if p.flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        for name, args in p.ops:
            img = apply_op(img, name, *args)
        return to_tensor_normalized(img)

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        rng = rng if rng is not None else np.random.default_rng()
        return self.apply(img, self.params(img.width, img.height, rng))


class EvalTransform:
    def __init__(self, image_size: int):
        self.image_size = int(image_size)

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        s = self.image_size
        return to_tensor_normalized(img.resize((s, s), Image.BICUBIC))


def train_transform(
    image_size: int, scale: tuple[float, float] = (0.2, 1.0), randaugment: bool = True, hflip: bool = True
) -> Callable[..., torch.Tensor]:
    """BLIP's train transform: ``f(img, rng=None) -> (3, size, size)`` float tensor.

    ``hflip=False`` drops the horizontal flip (BLIP flips; turn it off when captions name left and right, as
    the synthetic set's do: a flipped "circle on the left" is a wrong caption)."""
    return TrainTransform(image_size, scale, randaugment, hflip)


def eval_transform(image_size: int) -> Callable[..., torch.Tensor]:
    """BLIP's eval transform: bicubic resize to size×size, normalise."""
    return EvalTransform(image_size)

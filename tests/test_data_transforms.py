import numpy as np
import pytest
import torch
from PIL import Image

from fastblip.data.text import pre_caption, prompt_length, strip_prompt
from fastblip.data.tokenizer import load_tokenizer
from fastblip.data.transforms import (
    AUG_OPS,
    MEAN,
    STD,
    RandomAugment,
    apply_op,
    eval_transform,
    op_args,
    random_resized_crop_params,
    train_transform,
)  # fmt: skip


def test_pre_caption_official_rules():
    assert pre_caption('A "Dog" (running)!  On the.. Beach;\n') == "a dog running on the beach"
    assert pre_caption("Hello*#~:world", 50) == "hello world"
    assert pre_caption("one two three four", max_words=2) == "one two"
    assert pre_caption("keep, commas - and 'quotes'") == "keep, commas - and 'quotes'"
    assert pre_caption("   ") == ""


def test_prompt_helpers():
    tok = load_tokenizer()
    assert prompt_length(tok, "a picture of ") == 4  # [CLS] a picture of
    assert strip_prompt("a picture of a dog", "a picture of ") == "a dog"


def _img(w=80, h=60, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_eval_transform_matches_manual_bicubic():
    img = _img()
    x = eval_transform(32)(img)
    ref = np.asarray(img.resize((32, 32), Image.BICUBIC), dtype=np.float32) / 255
    ref = (ref - np.array(MEAN, dtype=np.float32)) / np.array(STD, dtype=np.float32)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x, torch.from_numpy(ref).permute(2, 0, 1), atol=1e-5)


def test_train_transform_shape_determinism_and_variety():
    img = _img(120, 90)
    tf = train_transform(48, scale=(0.5, 1.0))
    a = tf(img, np.random.default_rng(3))
    assert a.shape == (3, 48, 48)
    assert torch.equal(a, tf(img, np.random.default_rng(3)))  # all randomness comes from the rng
    assert not torch.equal(a, tf(img, np.random.default_rng(4)))


def test_random_resized_crop_area_distribution():
    rng = np.random.default_rng(0)
    areas, ratios = [], []
    for _ in range(2000):
        t, left, h, w = random_resized_crop_params(400, 300, (0.2, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= t and t + h <= 300 and 0 <= left and left + w <= 400
        areas.append(h * w / 120000)
        ratios.append(w / h)
    areas = np.array(areas)
    assert areas.min() > 0.18 and areas.max() <= 1.0
    # oracle: torchvision's RandomResizedCrop.get_params on the same image (mean area ≈ 0.496)
    import torchvision.transforms as T

    torch.manual_seed(0)
    img = Image.new("RGB", (400, 300))
    tv = [(lambda p: p[2] * p[3] / 120000)(T.RandomResizedCrop.get_params(img, (0.2, 1.0), (3 / 4, 4 / 3)))
          for _ in range(4000)]  # fmt: skip
    assert abs(areas.mean() - np.mean(tv)) < 0.02  # std of each mean ≈ 0.23/√2000 = 0.005
    assert 0.7 < min(ratios) and max(ratios) < 1.4


def test_randaugment_policy_and_magnitudes():
    ra = RandomAugment(2, 5)
    assert ra.ops == AUG_OPS and len(AUG_OPS) == 10
    rng = np.random.default_rng(0)
    counts = {op: 0 for op in AUG_OPS}
    n_applied = []
    for _ in range(4000):
        ops = ra.sample(rng)
        n_applied.append(len(ops))
        for name, args in ops:
            counts[name] += 1
            if name in ("ShearX", "ShearY"):
                assert abs(abs(args[0]) - 0.15) < 1e-9
            elif name in ("TranslateX", "TranslateY"):
                assert abs(abs(args[0]) - 5.0) < 1e-9
            elif name == "Rotate":
                assert abs(abs(args[0]) - 15.0) < 1e-9
            elif name in ("Brightness", "Sharpness"):
                assert args == (1.0,)
    # 2 draws × p 0.5 → mean 1 op applied; each op ~ 4000·2·0.5/10 = 400 times
    assert abs(np.mean(n_applied) - 1.0) < 0.05
    assert all(300 < c < 500 for c in counts.values()), counts
    signs = [np.sign(op_args("Rotate", 5, rng)[0]) for _ in range(2000)]
    assert abs(np.mean(signs)) < 0.1


def test_randaugment_ops_pixels():
    img = Image.fromarray(np.full((20, 30, 3), 200, np.uint8))
    # translate by +5 px (content moves left): the right 5 columns become the fill 128
    out = np.asarray(apply_op(img, "TranslateX", 5.0))
    assert (out[:, -5:] == 128).all() and (out[:, :-6] == 200).all()
    out = np.asarray(apply_op(img, "Rotate", 15.0))
    assert (out[0, 0] == 128).all() and (out[10, 15] == 200).all()
    out = np.asarray(
        apply_op(img, "ShearX", 0.15)
    )  # x' = x + 0.15·y about the top-left: row 0 stays, row 19 moves right by 2.85 px
    assert (out[0] == 200).all() and (out[-1, :2] == 128).all() and (out[-1, -3:] == 200).all()
    low = Image.fromarray(np.random.default_rng(0).integers(100, 150, (64, 64, 3), dtype=np.uint8))
    ac = np.asarray(apply_op(low, "AutoContrast"))
    assert ac.min() == 0 and ac.max() == 255
    eq = np.asarray(apply_op(low, "Equalize"))  # 4096 px over 50 levels: step 16, so the histogram spreads
    assert eq.max() == 255 and eq.std() > np.asarray(low).std()
    assert apply_op(img, "Brightness", 1.0) is img


def test_randaugment_rejects_unknown_op():
    with pytest.raises(ValueError, match="Solarize"):
        RandomAugment(ops=("Solarize",))

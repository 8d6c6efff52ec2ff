"""DALI backend: CPU-only pipeline (device_id=None) here; nvJPEG "mixed" decode under the gpu mark."""

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from fastblip.data import Batch, build_loader
from fastblip.data.transforms import STD

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI not installed (pip install nvidia-dali-cuda130)")


@pytest.fixture(scope="module")
def web_tar(tmp_path_factory):
    """Four web-like 500×400 JPEGs at quality 90 (smooth gradients + noise)."""
    rng = np.random.default_rng(0)
    x = np.linspace(0, 1, 500)[None, :, None]
    y = np.linspace(0, 1, 400)[:, None, None]
    path = tmp_path_factory.mktemp("dali") / "web-00000.tar"
    with tarfile.open(path, "w") as tf:
        for k in range(4):
            a = 255 * np.concatenate(
                [x * np.ones_like(y), y * np.ones_like(x), np.sin(6 * x * y + k) ** 2], 2
            )
            a = np.clip(a + rng.integers(-20, 20, a.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, "JPEG", quality=90)
            for ext, data in (("jpg", buf.getvalue()), ("txt", f"a photo number {k}".encode())):
                info = tarfile.TarInfo(f"{k:09d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return str(path)


def _pixels_255(b):
    return b.pixel_values * torch.tensor(STD).view(1, 3, 1, 1) * 255


@pytest.mark.parametrize("size", [64, 224])
def test_dali_cpu_eval_matches_pil(web_tar, size):
    pil = next(iter(build_loader(web_tar, image_size=size, batch_size=4, train=False, num_workers=0)))
    dali = next(iter(build_loader(web_tar, image_size=size, batch_size=4, train=False, backend="dali")))
    assert isinstance(dali, Batch) and dali.pixel_values.shape == (4, 3, size, size)
    assert dali.keys == pil.keys and dali.texts == pil.texts and torch.equal(dali.input_ids, pil.input_ids)
    assert torch.equal(dali.image_ids, pil.image_ids)
    d = (_pixels_255(pil) - _pixels_255(dali)).abs()
    # measured: max 1 level, mean 0.1–0.2 (libjpeg-turbo both; cubic+antialias vs PIL bicubic)
    assert d.mean() < 0.5 and d.max() <= 2.0 + 1e-3


def test_dali_cpu_train_pipeline(web_tar):
    loader = build_loader(
        web_tar, image_size=32, batch_size=2, train=True, backend="dali", seed=3, min_scale=0.5
    )
    batches = list(loader)
    assert len(loader) == len(batches) == 2 and all(isinstance(b, Batch) for b in batches)
    b = batches[0]
    assert b.pixel_values.shape == (2, 3, 32, 32) and torch.isfinite(b.pixel_values).all()
    assert loader.stats["ok"] == 4


def test_dali_missing_shard_counted(web_tar, tmp_path):
    loader = build_loader([web_tar, str(tmp_path / "gone.tar")], image_size=32, batch_size=4, train=False,
                          backend="dali")  # fmt: skip
    list(loader)
    assert loader.stats["skipped"] == {"missing_shard": 1}
    with pytest.raises(FileNotFoundError):
        build_loader(str(tmp_path / "gone.tar"), image_size=32, batch_size=4, train=False, backend="dali")


@pytest.mark.gpu
def test_dali_gpu_mixed_decode_matches_pil(web_tar):
    pil = next(iter(build_loader(web_tar, image_size=224, batch_size=4, train=False, num_workers=0)))
    dali = next(
        iter(build_loader(web_tar, image_size=224, batch_size=4, train=False, backend="dali", device="cuda"))
    )
    assert dali.pixel_values.is_cuda
    d = (_pixels_255(pil) - _pixels_255(dali).cpu()).abs()
    assert d.mean() < 1.5 and d.quantile(0.99) < 8  # nvJPEG's IDCT/upsampling differ from libjpeg-turbo

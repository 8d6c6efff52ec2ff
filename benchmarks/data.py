"""Data loading images/sec: PIL DataLoader workers vs DALI (CPU decode; nvJPEG "mixed" decode on CUDA).

Input: web-like JPEGs (~500×400, quality 90: gradients + noise) in webdataset shards, eval-style and
train-style transforms at 224 and 384 px. Timing excludes the first batch (worker start, pipeline build).
``dali-feed`` rows time the DALI backend's Python half alone in one worker (read, validate the header,
draw the transform, tokenise): what one DataLoader worker can feed DALI.
Rows: {"suite": "data", "impl", "image_size", "images_per_sec", "num_workers", ...}; an impl that cannot run
records ``"error"`` with the reason instead of a number.
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

SIZES = {"tiny": (32, 8), "base": (512, 32), "large": (4096, 128)}  # images, batch size


def make_shards(out_dir: str, num: int, per_shard: int = 256, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, 500)[None, :, None]
    y = np.linspace(0, 1, 400)[:, None, None]
    n_shards = -(-num // per_shard)
    for s in range(n_shards):
        with tarfile.open(os.path.join(out_dir, f"bench-{s:05d}.tar"), "w") as tf:
            for i in range(s * per_shard, min(num, (s + 1) * per_shard)):
                f = rng.uniform(2, 12, 3)
                a = 127.5 * (1 + np.sin(np.concatenate([f[0] * x + y, f[1] * y * x, f[2] * (x - y)], 2) * 3))
                a = np.clip(a + rng.normal(0, 12, a.shape), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(a).save(buf, "JPEG", quality=90)
                for ext, data in (("jpg", buf.getvalue()), ("txt", f"a synthetic web photo {i}".encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return os.path.join(out_dir, f"bench-{{00000..{n_shards - 1:05d}}}.tar")


def _time(loader) -> tuple[float, int]:
    it = iter(loader)
    first = next(it)
    n, t0 = 0, time.perf_counter()
    for b in it:
        n += len(b)
    last = b if n else first
    if getattr(last, "pixel_values", None) is not None and last.pixel_values.is_cuda:
        import torch

        torch.cuda.synchronize()
    return n / max(time.perf_counter() - t0, 1e-9), n


def run(device: str = "cpu", size: str = "tiny", on_row=None) -> list[dict]:
    from fastblip.data import build_loader

    num, bs = SIZES[size]
    workers = max(1, min(8, (os.cpu_count() or 2)))
    rows = []
    with tempfile.TemporaryDirectory() as d:
        shards = make_shards(d, num)
        for image_size in (224, 384):
            for train in (False, True):
                base = {"suite": "data", "image_size": image_size, "transform": "train" if train else "eval",
                        "batch_size": bs, "images": num, "device": device}  # fmt: skip
                ips, n = _time(build_loader(shards, image_size=image_size, batch_size=bs, train=train,
                                            num_workers=workers, drop_last=False))  # fmt: skip
                rows.append(
                    {**base, "impl": "pil", "num_workers": workers, "images_per_sec": ips, "timed": n}
                )
                impl = "dali-gpu" if device.startswith("cuda") else "dali-cpu"
                try:
                    loader = build_loader(shards, image_size=image_size, batch_size=bs, train=train, backend="dali",
                                          num_workers=workers, device=device if impl == "dali-gpu" else None)  # fmt: skip
                    ips, n = _time(loader)
                    rows.append(
                        {**base, "impl": impl, "num_workers": workers, "images_per_sec": ips, "timed": n}
                    )
                    # the DALI backend's Python half alone, in one worker: read, validate, draw, tokenise
                    # (workers × this rate bounds what DALI can be fed; the target is 3,000 img/s per GPU)
                    feed = build_loader(shards, image_size=image_size, batch_size=bs, train=train, backend="dali",
                                        num_workers=0).inner  # fmt: skip
                    ips, n = _time(feed)
                    rows.append({**base, "impl": "dali-feed", "num_workers": 1, "images_per_sec": ips, "timed": n})
                except (ImportError, RuntimeError) as e:
                    rows.append({**base, "impl": impl, "num_workers": workers, "images_per_sec": None,
                                 "error": f"{type(e).__name__}: {e}".splitlines()[0]})  # fmt: skip
    return rows


if __name__ == "__main__":
    import argparse
    import json

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", default="tiny", choices=sorted(SIZES))
    a = p.parse_args()
    for row in run(a.device, a.size):
        print(json.dumps(row))

"""Pretraining throughput: the fast path vs the reference path in the same process (PERFORMANCE.md targets).

    python benchmarks/pretrain.py --device cuda --size base      # ViT-B/16 at 224 on one GPU
    python benchmarks/pretrain.py                                # tiny model, CPU smoke size

Rows: ``reference`` = the official arithmetic (fp32 eager, TF32 off, explicit attention, four cross-attention
K/V projections per image, text padded to max_length 30); ``reference_bf16`` (CUDA) = the same under bf16
autocast (what LAVIS's AMP gives); ``fast`` = shared cross-attention K/V, padding to the longest caption,
SDPA attention, fused ops (Triton on CUDA), bf16 autocast on CUDA. Captions have 8–20 tokens (mean 14, web
captions' typical length). One optimiser step per timed iteration (AdamW); warm-up steps excluded.
MFU is against the *reference* FLOPs per image (``reference_flops_per_image``), whatever the path executes.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from benchmarks.common import peak_tflops
from fastblip.config import ModelConfig, tiny_config


def reference_flops_per_image(cfg: ModelConfig, text_len: int = 30) -> float:
    """Matmul FLOPs of one image's reference step (2 FLOPs per multiply-add; backward = 2 × forward for the
    trained parts; momentum encoders forward only). ViT-B/16 at 224, BERT-base, L=30 -> 306.9e9; ViT-L 681.1e9.

    ViT per block: 2·N·(4C² + 2·r·C²) (qkv + proj + MLP) + 4·N²·C (QKᵀ and AV); patch embed 2·(N−1)·3P²·C.
    Text layer: 2·L·(4H² + 2·H·F) + 4·L²·H; cross-attention adds 2·L·2H² (q, out) + 2·N·2·Cv·H (K/V of the N
    image tokens) + 4·L·N·H. LM head 2·L·(H² + H·V). ITC: student + teacher logits against batch + queue.
    """
    v, t = cfg.vision, cfg.text
    n_tok = (v.image_size // v.patch_size) ** 2 + 1
    C, r = v.width, v.mlp_ratio
    vit = v.depth * (2 * n_tok * (4 * C * C + 2 * r * C * C) + 4 * n_tok * n_tok * C)
    vit += 2 * (n_tok - 1) * 3 * v.patch_size**2 * C
    H, F, Lt = t.hidden_size, t.intermediate_size, text_len
    text = t.num_layers * (2 * Lt * (4 * H * H + 2 * H * F) + 4 * Lt * Lt * H)
    cross = t.num_layers * (2 * Lt * 2 * H * H + 2 * n_tok * 2 * C * H + 4 * Lt * n_tok * H)
    grounded = text + cross  # one image-grounded pass (ITM pair or decoder)
    lm_head = 2 * Lt * (H * H + H * t.vocab_size)
    itc = 2 * 2 * cfg.queue_size * cfg.embed_dim  # two directions, one row of logits against the queue
    trained_fwd = vit + text + 3 * grounded + grounded + lm_head + itc
    momentum_fwd = vit + text + itc  # momentum encoders + teacher logits
    return 3 * trained_fwd + momentum_fwd


def _inputs(cfg: ModelConfig, batch: int, device, pad_to: int | None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    S = cfg.vision.image_size
    px = torch.randn(batch, 3, S, S, generator=g)
    lens = torch.randint(8, 21, (batch,), generator=g)
    L = pad_to or int(lens.max())
    ar = torch.arange(L)
    ids = torch.randint(1000, 29000, (batch, L), generator=g)
    ids[:, 0] = 101
    ids[ar[None] == (lens[:, None] - 1)] = 102
    mask = (ar[None] < lens[:, None]).long()
    return px.to(device), (ids * mask).to(device), mask.to(device)


def _config(size: str) -> tuple[ModelConfig, int]:
    if size == "tiny":
        return tiny_config(queue_size=64), 16
    cfg = ModelConfig()
    if size == "large":
        cfg.vision.width, cfg.vision.depth, cfg.vision.heads, cfg.vision.drop_path_rate = 1024, 24, 16, 0.1
        return cfg, 32
    return cfg, 64


def _time_impl(model, cfg, batch, device, impl, steps, warmup) -> dict:
    dev = torch.device(device)
    ref = impl.startswith("reference")
    model.cfg.shared_cross_kv = not ref
    model.set_backends(attention="reference" if ref else "auto", ops="reference" if ref else None)
    amp = dev.type == "cuda" and impl != "reference"
    px, ids, mask = _inputs(cfg, batch, dev, pad_to=cfg.max_text_len if ref else None)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.05,
                            fused=dev.type == "cuda" or None)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            out = model(px, ids, mask, alpha=0.4)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None
    return {"images_per_sec": batch * steps / dt, "peak_mem_mb": round(peak, 1) if peak else None}


def run(device: str = "cpu", size: str = "tiny", steps: int | None = None, batch: int | None = None,
        warmup: int | None = None) -> list[dict]:
    """Rows {suite, impl, size, batch, images_per_sec, ratio_vs_reference, mfu, peak_mem_mb, device}."""
    from fastblip.models.blip import build_model

    cfg, default_batch = _config(size)
    batch = batch or default_batch
    steps = steps or (3 if device == "cpu" else 10)
    warmup = warmup if warmup is not None else (1 if device == "cpu" else 3)
    dev = torch.device(device)
    if dev.type == "cuda":  # the reference is the official arithmetic: full fp32 matmuls
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    base = build_model(cfg).to(dev).train()
    impls = ["reference", "fast"] + (["reference_bf16"] if dev.type == "cuda" else [])
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = peak_tflops(dev.type)  # bf16 dense, per GPU
    flops = reference_flops_per_image(cfg)
    rows, ref_ips = [], None
    for impl in impls:
        model = copy.deepcopy(base)
        r = _time_impl(model, cfg, batch, dev, impl, steps, warmup)
        del model
        if impl == "reference":
            ref_ips = r["images_per_sec"]
        mfu = (r["images_per_sec"] * flops / (peak * 1e12)) if peak else None
        rows.append({"suite": "pretrain", "impl": impl, "size": size, "batch": batch,
                     "images_per_sec": round(r["images_per_sec"], 2),
                     "ratio_vs_reference": round(r["images_per_sec"] / ref_ips, 3),
                     "mfu": round(mfu, 4) if mfu is not None else None, "peak_mem_mb": r["peak_mem_mb"],
                     "device": name, "gflop_per_image_ref": round(flops / 1e9, 2)})
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", default=None, choices=("tiny", "base", "large"))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    a = ap.parse_args()
    size = a.size or ("base" if a.device.startswith("cuda") else "tiny")
    for row in run(a.device, size, a.steps, a.batch):
        print(json.dumps(row))

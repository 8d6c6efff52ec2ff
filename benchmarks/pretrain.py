"""Pretraining throughput: what each part of the fast path buys, measured in one process (PERFORMANCE.md).

    python -m benchmarks pretrain --device cuda --size base      # ViT-B/16 at 224 on one GPU
    python -m benchmarks pretrain --device cpu --size tiny       # tiny model, CPU smoke size

Rows (one optimiser step of AdamW per timed iteration, warm-up and compilation excluded):
- ``reference``: the official arithmetic: fp32 eager, TF32 off, explicit attention, four cross-attention K/V
  projections per image, fused ops on their reference, text padded to max_length.
- ``reference_bf16`` (CUDA): the same under bf16 autocast (what LAVIS's AMP gives).
- ``fast_eager``: shared cross-attention K/V, SDPA, the fused ops' measured CUDA defaults
  (``fastblip.backends.CUDA_DEFAULT``), bf16 autocast on CUDA, text padded in buckets of 8 (``data.padding=auto``).
- ``fast_compiled``: ``fast_eager`` with the whole step compiled (``fastblip.train.step``, fullgraph).
- ``fast_compiled[<op>=reference]`` (CUDA): ``fast_compiled`` with that one fused op on its reference, so each
  kernel's end-to-end share shows.
Captions have 8-20 tokens (mean 14, web captions' typical length).

FLOPs: ``gflop_ref`` is the reference algorithm's matmul count per image (``reference_flops_per_image``, the
PERFORMANCE.md formula, L=30); ``gflop_exec`` is what the row executes, measured with
``torch.utils.flop_counter.FlopCounterMode`` over one eager step (forward + backward; the compiled rows execute
the same algorithm as ``fast_eager``); the Triton custom ops are counted by their own formulas below. MFU is
reported against both: ``mfu`` (reference FLOPs: algorithmic savings show as higher MFU) and ``mfu_exec``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from benchmarks.common import peak_tflops
from fastblip.config import ModelConfig, tiny_config

OPS = ("itc_loss", "sample_hard_negatives", "cross_attention", "lm_cross_entropy")


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


# ----------------------------------------------------------------------------------------------- FLOP counting
_FORMULAS_DONE = False


def _register_kernel_flops() -> None:
    """FlopCounterMode sees a Triton custom op as one opaque op: give each the matmul FLOPs it does."""
    global _FORMULAS_DONE
    if _FORMULAS_DONE:
        return
    from torch.utils.flop_counter import register_flop_formula

    import fastblip.kernels.cross_attention  # noqa: F401 - registers the ops
    import fastblip.kernels.itc_loss  # noqa: F401
    import fastblip.kernels.lm_cross_entropy  # noqa: F401

    ops = torch.ops.fastblip

    @register_flop_formula(ops.itc_loss_fwd)
    def _(img_shape, txt_shape, img_m_shape, *args, **kwargs) -> int:
        B, d = img_shape
        return 2 * 2 * 2 * B * img_m_shape[0] * d  # student + teacher logits, two directions

    @register_flop_formula(ops.itc_loss_bwd)
    def _(grad_shape, img_shape, txt_shape, img_m_shape, *args, **kwargs) -> int:
        B, d = img_shape
        return 2 * 3 * 2 * B * img_m_shape[0] * d  # recomputed logits + d query, two directions

    @register_flop_formula(ops.cross_attention_fwd)
    def _(q_shape, k_shape, *args, **kwargs) -> int:
        N, H, Lq, D = q_shape
        return 2 * 2 * N * H * Lq * k_shape[2] * D  # QKᵀ and PV

    @register_flop_formula(ops.cross_attention_bwd)
    def _(go_shape, q_shape, k_shape, *args, **kwargs) -> int:
        N, H, Lq, D = q_shape
        return 5 * 2 * N * H * Lq * k_shape[2] * D  # QKᵀ again, dV, dP, dQ, dK

    @register_flop_formula(ops.lm_cross_entropy_fwd)
    def _(h_shape, w_shape, *args, **kwargs) -> int:
        return 3 * 2 * h_shape[0] * h_shape[1] * w_shape[0]  # logits + d hidden + d weight (grads in forward)

    _FORMULAS_DONE = True


def measured_flops(step) -> float:
    """FLOPs of one call of ``step`` (forward + backward), as dispatched."""
    from torch.utils.flop_counter import FlopCounterMode

    _register_kernel_flops()
    with FlopCounterMode(display=False) as fc:
        step()
    return float(fc.get_total_flops())


# ----------------------------------------------------------------------------------------------- inputs
def _batch(cfg: ModelConfig, batch: int, device, padding: str, seed: int = 0):
    """Random pixels and captions of 8-20 tokens padded as ``padding`` (a resolved ``Backends.padding``)."""
    from fastblip.data.batch import Batch, bucket_length

    g = torch.Generator().manual_seed(seed)
    S = cfg.vision.image_size
    px = torch.randn(batch, 3, S, S, generator=g)
    lens = torch.randint(8, 21, (batch,), generator=g)
    if padding == "max_length":
        L = cfg.max_text_len
    elif padding.startswith("buckets:"):
        L = bucket_length(int(lens.max()), tuple(int(x) for x in padding[8:].split(",")), cfg.max_text_len)
    else:  # longest
        L = int(lens.max())
    ar = torch.arange(L)
    ids = torch.randint(1000, 29000, (batch, L), generator=g)
    ids[:, 0] = 101
    ids[ar[None] == (lens[:, None] - 1)] = 102
    mask = (ar[None] < lens[:, None]).long()
    return Batch(px, ids * mask, mask, torch.arange(batch)).to(device)


def _config(size: str) -> tuple[ModelConfig, int]:
    if size == "tiny":
        return tiny_config(queue_size=64), 16
    cfg = ModelConfig()
    if size == "large":
        cfg.vision.width, cfg.vision.depth, cfg.vision.heads, cfg.vision.drop_path_rate = 1024, 24, 16, 0.1
        return cfg, 32
    return cfg, 64


def _impls(dev: torch.device) -> list[tuple[str, dict]]:
    """(row name, settings) in the order they run."""
    cuda = dev.type == "cuda"
    out = [("reference", dict(ref=True, amp=False, compile=False, ops={}))]
    if cuda:
        out.append(("reference_bf16", dict(ref=True, amp=True, compile=False, ops={})))
    out += [("fast_eager", dict(ref=False, amp=cuda, compile=False, ops={})),
            ("fast_compiled", dict(ref=False, amp=cuda, compile=True, ops={}))]
    if cuda:  # on CPU every fused op already runs its reference
        out += [(f"fast_compiled[{op}=reference]", dict(ref=False, amp=True, compile=True, ops={op: "reference"}))
                for op in OPS]
    return out


def _time_impl(base, cfg, batch, dev, s: dict, steps: int, warmup: int) -> dict:
    from fastblip.backends import resolve
    from fastblip.train.step import TrainStep, compile_step

    model = copy.deepcopy(base)
    ref = s["ref"]
    model.cfg.shared_cross_kv = not ref
    ops = dict.fromkeys(OPS, "reference") if ref else {**dict.fromkeys(OPS, "auto"), **s["ops"]}
    bk = resolve(dev, attention="reference" if ref else "auto", ops=ops, compile=s["compile"], amp="auto",
                 padding="max_length" if ref else "auto", max_length=cfg.max_text_len)
    model.set_backends(attention=bk.attention, ops=dict(bk.ops))
    b = _batch(cfg, batch, dev, bk.padding)
    step_mod = TrainStep(model)
    flops = measured_flops(lambda: step_mod(b, 0.4)["loss"].backward())  # eager: what compiled rows run too
    model.zero_grad(set_to_none=True)
    compile_step(step_mod, bk.compile)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.05,
                            fused=bk.optimizer == "adamw_fused" or None)
    alpha = torch.full((), 0.4, device=dev)

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=s["amp"]):
            out = step_mod(b, alpha)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):  # compile (first call) and allocator warm-up excluded
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None
    return {"images_per_sec": batch * steps / dt, "peak_mem_mb": round(peak, 1) if peak else None,
            "flops_exec": flops, "backends": bk.line().removeprefix("backends: ")}


def run(device: str = "cpu", size: str = "tiny", steps: int | None = None, batch: int | None = None,
        warmup: int | None = None, only: str | None = None, on_row=None) -> list[dict]:
    """Rows {suite, impl, size, batch, images_per_sec, ratio_vs_reference, gflop_ref, gflop_exec, mfu,
    mfu_exec, peak_mem_mb, device, backends}. ``only``: comma-separated row names to run (reference always).
    ``on_row(rows)`` after each row (the rows so far), so a timeout keeps what finished."""
    from fastblip.models import build_model

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
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = peak_tflops(dev.type)  # bf16 dense, per GPU
    flops_ref = reference_flops_per_image(cfg)
    keep = set(only.split(",")) | {"reference"} if only else None
    rows, ref_ips = [], None
    from fastblip.backends import resolve_op

    for impl, s in _impls(dev):
        if keep is not None and impl not in keep:
            continue
        forced = [op for op, be in s["ops"].items() if resolve_op(op, "auto", dev.type) == be]
        if forced:  # the op's default already is its reference: this row would time fast_compiled again
            rows.append({"suite": "pretrain", "impl": impl, "size": size, "batch": batch, "device": name,
                         "note": f"same as fast_compiled: the CUDA default of {forced[0]} is its reference"})
            if on_row:
                on_row(rows)
            continue
        r = _time_impl(base, cfg, batch, dev, s, steps, warmup)
        exec_flops = r["flops_exec"] / batch
        ips = r["images_per_sec"]
        ref_ips = ips if impl == "reference" else ref_ips
        rows.append({"suite": "pretrain", "impl": impl, "size": size, "batch": batch,
                     "images_per_sec": round(ips, 2), "ratio_vs_reference": round(ips / ref_ips, 3),
                     "gflop_ref": round(flops_ref / 1e9, 2), "gflop_exec": round(exec_flops / 1e9, 2),
                     "mfu": round(ips * flops_ref / (peak * 1e12), 4) if peak else None,
                     "mfu_exec": round(ips * exec_flops / (peak * 1e12), 4) if peak else None,
                     "peak_mem_mb": r["peak_mem_mb"], "device": name, "backends": r["backends"]})
        if on_row:
            on_row(rows)
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", default=None, choices=("tiny", "base", "large"))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--only", default=None, help="comma-separated row names (reference always runs)")
    a = ap.parse_args()
    size = a.size or ("base" if a.device.startswith("cuda") else "tiny")
    for row in run(a.device, size, a.steps, a.batch, only=a.only):
        print(json.dumps(row))

"""`fastblip caption`, `fastblip score`, `fastblip convert` (DESIGN §3 CLI table).

Inputs are checked before the model is loaded: a missing/unreadable image or checkpoint is one error line
(``fastblip.cli.main`` prints it, exit code 1, no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fastblip.errors import InputError, UsageError

# generation options `caption` takes as key=value, with their types (generation.generate_ids' arguments)
CAPTION_KEYS = {"method": str, "num_beams": int, "max_length": int, "min_length": int, "top_p": float,
                "top_k": int, "temperature": float, "repetition_penalty": float, "prompt": str,
                "num_return_sequences": int, "seed": int}


def add_parsers(sub) -> None:
    p = sub.add_parser("caption", help="caption images with a captioning (or pretrained) model",
                       usage="fastblip caption IMAGE... --checkpoint PATH [--device DEV] [--image-size N] [--json] "
                             "[key=value ...]",
                       description="Caption IMAGE... Options as key=value: " + ", ".join(CAPTION_KEYS)
                       + " (method: beam | nucleus | greedy).")
    _common(p, required=False)
    # IMAGE... and key=value may sit before or after the options (`caption a.jpg --checkpoint X method=greedy`):
    # argparse's parse_args cannot interleave positionals with a subparser, so the rest is re-parsed in
    # run_caption with parse_intermixed_args
    p.add_argument("images", nargs=argparse.REMAINDER, metavar="IMAGE... [key=value ...]")
    p.set_defaults(func=run_caption)

    p = sub.add_parser("score", help="ITM match probability and ITC cosine of an image and a text",
                       description="Score IMAGE against TEXT with a retrieval/ITM (or pretrained) model.")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("text", metavar="TEXT")
    _common(p)
    p.set_defaults(func=run_score)

    p = sub.add_parser("convert", help="convert a checkpoint between fastblip, official .pth and HF formats",
                       description="Convert SRC (fastblip dir, official .pth, HF dir, released name) to DST: a "
                                   "directory (fastblip, hf) or a .pth file (official; .pth is added when DST has "
                                   "no .pth/.pt suffix).")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument("--to", required=True, choices=("fastblip", "official", "hf"), help="output format")
    p.add_argument("--image-size", type=int, default=None, help="rebuild the ViT for this image size")
    p.add_argument("--json", action="store_true", help="print {'src', 'dst', 'format', 'kind'} as JSON")
    p.set_defaults(func=run_convert)

    p = sub.add_parser("migrate", help="rewrite an old training checkpoint (numpy inside) as a weights_only-safe "
                                       "one; unpickles it: only for files you trust",
                       description="Training checkpoints written before they were weights_only-safe hold numpy "
                                   "arrays, which fastblip refuses to unpickle (unpickling runs code). This verb "
                                   "loads FILE with torch.load(weights_only=False) and writes it back as tensors; "
                                   "run it only on a file you trust (you wrote it).")
    p.add_argument("src", metavar="FILE")
    p.add_argument("dst", metavar="DST", nargs="?", help="output file (default: replace FILE)")
    p.add_argument("--i-trust-this-file", dest="trust", action="store_true", required=True,
                   help="required: FILE is unpickled, which executes any code it carries")
    p.set_defaults(func=run_migrate)


def _common(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--checkpoint", required=required, metavar="PATH",
                   help="fastblip dir, official .pth, HF dir, or a released name (downloaded when online)")
    p.add_argument("--device", default=None, help="e.g. cuda, cpu (default: cuda when available)")
    p.add_argument("--image-size", type=int, default=None, help="override the checkpoint's image size")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _check_paths(images: list[str]) -> None:
    from fastblip.processor import ImageReadError

    for im in images:
        if not Path(im).is_file():
            raise ImageReadError(f"image not found: {im}")


def _load(args):
    import torch

    import fastblip
    from fastblip.config import check_device

    check_device(args.device)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return fastblip.load(args.checkpoint, image_size=args.image_size, device=device)


def _parse_caption_opts(items: list[str]) -> dict:
    from fastblip.config import parse_overrides

    opts = parse_overrides(items)
    out = {}
    for k, v in opts.items():
        if k not in CAPTION_KEYS:
            raise UsageError(f"unknown caption option '{k}' (valid: {', '.join(CAPTION_KEYS)})")
        try:
            out[k] = CAPTION_KEYS[k](v)
        except (TypeError, ValueError):
            raise UsageError(f"caption option '{k}': cannot read {v!r} as {CAPTION_KEYS[k].__name__}") from None
    return out


def _reparse_caption(args) -> None:
    inner = argparse.ArgumentParser(prog="fastblip caption", add_help=False)
    inner.add_argument("items", nargs="*")
    _common(inner, required=False)
    try:
        ns, unknown = inner.parse_known_intermixed_args(args.images)
    except SystemExit:
        raise UsageError("cannot parse the caption arguments (see fastblip caption --help)") from None
    if unknown:
        raise UsageError(f"unrecognized arguments: {' '.join(unknown)}")
    for k in ("checkpoint", "device", "image_size"):
        if getattr(ns, k) is not None:
            setattr(args, k, getattr(ns, k))
    args.json = args.json or ns.json
    args.images = ns.items
    if not args.checkpoint:
        raise UsageError("the following arguments are required: --checkpoint")


def run_caption(args) -> int:
    import torch

    from fastblip.processor import Processor

    _reparse_caption(args)
    images = [x for x in args.images if "=" not in x]
    opts = _parse_caption_opts([x for x in args.images if "=" in x])
    if not images:
        raise UsageError("no IMAGE given")
    _check_paths(images)
    model = _load(args)
    if model.cfg.kind not in ("pretrain", "caption"):
            raise UsageError(f"{args.checkpoint} is a '{model.cfg.kind}' model; caption needs a decoder "
                        "(a pretrained or captioning checkpoint)")
    proc = Processor.from_model(model)
    pixels = proc.images(images).to(model.device, next(model.parameters()).dtype)
    seed = opts.pop("seed", None)
    if seed is not None:
        opts["generator"] = torch.Generator().manual_seed(seed)
    caps = model.generate(pixels, **opts)
    rows = [{"image": im, "caption": c} for im, c in zip(images, caps, strict=True)]
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            c = r["caption"] if isinstance(r["caption"], str) else " | ".join(r["caption"])
            print(f"{r['image']}\t{c}")
    return 0


def run_score(args) -> int:
    import torch

    from fastblip.processor import Processor

    _check_paths([args.image])
    _check_text(args.text)
    model = _load(args)
    if model.cfg.kind not in ("pretrain", "retrieval", "itm"):
        raise UsageError(f"{args.checkpoint} is a '{model.cfg.kind}' model; score needs ITM and ITC heads "
                        "(a pretrained or retrieval/ITM checkpoint)")
    proc = Processor.from_model(model)
    batch = proc(images=[args.image], text=[args.text])
    pv = batch["pixel_values"].to(model.device, next(model.parameters()).dtype)
    ids, mask = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
    with torch.no_grad():
        prob = model.itm_logits(pv, ids, mask).float().softmax(dim=-1)[0, 1].item()
        cos = model.itc_similarity(pv, ids, mask).float()[0, 0].item()
    out = {"itm_match_prob": prob, "itc_cosine": cos}
    print(json.dumps(out) if args.json else f"itm_match_prob {prob:.4f}\titc_cosine {cos:.4f}")
    return 0


def _check_text(text: str) -> None:
    """TEXT that can be scored: valid UTF-8 (argv bytes that are not arrive as lone surrogates) and not empty
    once cleaned as BLIP cleans captions (an empty text would be scored as the bare [CLS] [SEP])."""
    from fastblip.data.text import pre_caption

    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"TEXT is not valid UTF-8 (byte {e.object[e.start:e.end]!r} at position {e.start})") from None
    if not pre_caption(text, 50):
        raise InputError(f"TEXT {text!r} is empty once cleaned (lowercased, punctuation removed): nothing to score")


def run_migrate(args) -> int:
    from fastblip.train.checkpoint import migrate_checkpoint

    dst = migrate_checkpoint(args.src, args.dst)
    print(f"wrote weights_only-safe checkpoint {dst}", file=sys.stderr)
    return 0


def official_path(dst: str) -> str:
    """An official checkpoint is a ``.pth`` file (what the official code, and ``fastblip.load``, look for): DST
    without ``.pth``/``.pt`` gets ``.pth`` (``model`` -> ``model.pth``; it wrote an extensionless file)."""
    p = Path(dst)
    if p.suffix.lower() in (".pth", ".pt") or p.is_dir():
        return dst  # a directory is refused by save, with its own message
    return dst + ".pth"


def run_convert(args) -> int:
    import fastblip

    dst = official_path(args.dst) if args.to == "official" else args.dst
    model = fastblip.load(args.src, image_size=args.image_size)
    dst = fastblip.save(model, dst, format=args.to)
    if args.json:
        print(json.dumps({"src": args.src, "dst": str(dst), "format": args.to, "kind": model.cfg.kind}))
    else:
        note = ""
        if args.to == "hf":
            from fastblip.checkpoints.hf import not_in_hf

            left_out = not_in_hf(model)
            note = f" (left out training-only tensors HF has no place for: {', '.join(left_out)})" if left_out else ""
        print(f"wrote {args.to} checkpoint ({model.cfg.kind}) to {dst}{note}", file=sys.stderr)
    return 0

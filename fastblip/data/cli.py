"""``fastblip data synth`` and ``fastblip data check``."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from fastblip.errors import FastblipError, InputError

from .check import check_sources
from .decode import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_TEXT_BYTES
from .synth import make_synthetic


def add_data_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("data", help="synthetic data and data-source validation",
                              description="Make the synthetic dataset or check data sources.")  # fmt: skip
    sub = p.add_subparsers(dest="data_cmd", metavar="{synth,check}")
    sub.required = True
    s = sub.add_parser("synth", help="write the synthetic noisy image-text dataset",
                       description="Write web (noisy), human (clean) and eval splits as shards and BLIP JSON.")  # fmt: skip
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--num", type=int, default=1000, help="web samples (default 1000)")
    s.add_argument("--noise", type=float, default=0.3, help="fraction of web captions replaced (default 0.3)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--human", type=int, default=None, help="human split size (default num/2)")
    s.add_argument("--eval-num", type=int, default=None, help="eval split size (default max(8, num/10))")
    s.add_argument("--shard-size", type=int, default=200)
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    c = sub.add_parser("check", help="count readable and skipped samples of data sources",
                       description="Read every sample through the decode path; exit 0 when the source could be "
                                   "read at all. SOURCE: shard path/pattern/URL, or ann.json / json:ann.json::ROOT.")  # fmt: skip
    c.add_argument("sources", nargs="+", metavar="SOURCE")
    c.add_argument("--json", action="store_true", help="print the counts as JSON")
    c.add_argument("--max-image-bytes", type=int, default=None,
                   help=f"skip image members/files larger than this (default {DEFAULT_MAX_IMAGE_BYTES >> 20} MiB, "
                        "or $FASTBLIP_MAX_IMAGE_BYTES)")
    c.add_argument("--max-text-bytes", type=int, default=None,
                   help=f"skip samples whose caption/.json member is larger (default {DEFAULT_MAX_TEXT_BYTES >> 20} "
                        "MiB, or $FASTBLIP_MAX_TEXT_BYTES)")
    return p


def run_data(args) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.data_cmd == "synth":
        try:
            r = make_synthetic(args.out, args.num, args.noise, args.seed, image_size=args.image_size,
                               human=args.human, eval_num=args.eval_num, shard_size=args.shard_size)  # fmt: skip
        except ValueError as e:  # make_synthetic's own argument checks (num, noise, sizes)
            raise InputError(str(e)) from None
        except OSError as e:
            raise InputError(f"cannot write {args.out} ({e.strerror or e})") from None
        if args.json:
            print(json.dumps(r))
        else:
            print(f"wrote {r['num_web']} web ({r['num_noisy']} noisy), {r.get('num_human', 0)} human, "
                  f"{r.get('num_eval', 0)} eval samples to {r['out']}")  # fmt: skip
        return 0
    for k in ("max_image_bytes", "max_text_bytes"):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            raise InputError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    r = check_sources(args.sources, max_image_bytes=args.max_image_bytes, max_text_bytes=args.max_text_bytes)
    if args.json:
        print(json.dumps(r))
    else:
        sk = ", ".join(f"{k} {v}" for k, v in sorted(r["skipped"].items())) or "none"
        print(f"ok {r['ok']}; skipped: {sk}; converted: {r['converted'] or 'none'}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastblip")
    add_data_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(argv)
    try:
        return run_data(args)
    except FastblipError as e:  # the same one-line policy and prefix as fastblip.cli
        print(f"fastblip data {args.data_cmd}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())


def add_parsers(subparsers) -> None:
    """Hook for ``fastblip.cli``: registers the ``data`` verb."""
    add_data_parser(subparsers).set_defaults(func=run_data)

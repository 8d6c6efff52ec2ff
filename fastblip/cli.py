"""`fastblip <verb>`: one console script over every stage of the BLIP workflow.

Each verb lives next to its code: a module listed in ``VERB_MODULES`` defines ``add_parsers(subparsers)``,
registering its verbs with ``set_defaults(func=...)``; ``func(args) -> int`` is the exit code.

Error policy (issue 15): a ``fastblip.FastblipError`` (bad recipe key, missing or wrong file, another run in
the out_dir, no GPU, ...) prints one line naming the file and the reason, exit code 1; ``-v`` prints its
traceback too. Anything else is a bug: Python's full traceback, whatever its type (a ValueError from deep
inside is not dressed up as user error).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback

from fastblip.errors import FastblipError, UsageError

VERB_MODULES = (
    "fastblip.train.cli",  # pretrain, finetune
    "fastblip.eval.cli",  # eval
    "fastblip.capfilt.cli",  # capfilt
    "fastblip.checkpoints.cli",  # caption, score, convert
    "fastblip.data.cli",  # data synth, data check
    "fastblip.demo",  # demo
)


# the name the verbs used before fastblip.errors existed: a command line that cannot be run as given
UserError = UsageError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastblip", description="BLIP rebuilt for speed: pretrain, finetune, "
                                "CapFilt, evaluate, caption and score images.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging; tracebacks for every error")
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    for name in VERB_MODULES:
        importlib.import_module(name).add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("fastblip: interrupted", file=sys.stderr)
        return 130
    except FastblipError as e:
        if args.verbose:
            traceback.print_exc()
        msg = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the message held
        print(f"fastblip {args.verb}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

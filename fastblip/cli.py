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


class _Stderr(logging.StreamHandler):
    """A console handler that writes to the current ``sys.stderr`` (tests and tqdm swap it)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__/setStream assign it; the property always reads sys.stderr
        pass


class _Format(logging.Formatter):
    """``12:03:41 WARNING fastblip.data: ...``; the run's own lines (``fastblip.run``) without level and name."""

    def format(self, record: logging.LogRecord) -> str:
        from fastblip.train.progress import RUN_LOG

        if (record.name == RUN_LOG or record.name.startswith(RUN_LOG + ".")) and record.levelno == logging.INFO:
            return f"{self.formatTime(record, self.datefmt)} {record.getMessage()}"
        return super().format(record)


def setup_logging(verbose: bool = False) -> None:
    """What a command prints besides its result, on stderr: warnings; the run's own account (``fastblip.run``:
    progress lines, evaluations, checkpoints written) as plain timestamped lines; the library's INFO and DEBUG
    (which backend, which file, how many tensors) only with ``-v``. Other packages' INFO stays silent."""
    from fastblip.train.progress import RUN_LOG

    h = _Stderr()
    h.setFormatter(_Format("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.WARNING, handlers=[h])  # a no-op where logging is configured already
    logging.getLogger("fastblip").setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger(RUN_LOG).setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
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
        verb = " ".join(v for v in (args.verb, getattr(args, "data_cmd", None)) if v)  # `data synth`, `data check`
        print(f"fastblip {verb}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

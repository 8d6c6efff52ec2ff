"""Every verb of the console script answers --help, and a bad recipe key is one clear line."""

import subprocess
import sys

import pytest

from fastblip.cli import build_parser, main

VERBS = ["pretrain", "finetune", "eval", "capfilt", "caption", "score", "convert", "data", "demo"]


def test_all_verbs_registered():
    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    assert set(VERBS) <= set(sub.choices)


@pytest.mark.parametrize("verb", VERBS)
def test_verb_help(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    assert "usage: fastblip " + verb in capsys.readouterr().out


def test_unknown_recipe_key_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fastblip", "pretrain", "--recipe", "recipes/pretrain_tiny_cpu.yaml",
                        "train.no_such_key=1"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "no_such_key" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1

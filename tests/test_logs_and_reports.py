"""Issue 17, items 2-4: logs a person can read, metrics where people look for them, the demo's report plot, and
the rough edges a newcomer hit. Each test fails on the behaviour the issue reported:

- redirected output held tqdm's carriage-return frames, no step total, no ETA, no checkpoint lines;
- library INFO printed without ``-v``; expected init_from drops were WARNINGs;
- ``finetune_retrieval`` ended with losses only; no TensorBoard files;
- CapFilt printed no precision/recall or score statistics, and its bar's kept counts were the last shard's;
- report.png: one shared axis for R@k, BLEU-4 and CIDEr, the legend over the bars, no r_mean, no filter;
- ``data`` errors, ``eval``/``capfilt`` without ``--device``, RST marks in ``demo --help``;
- benchmarks: NaN peak memory (invalid JSON), ``python -m benchmarks`` only from the repo root;
- ``convert --to official`` without ``.pth``, HF ``model.safetensors`` written 0600.

Trainings here are a few steps of the tiny recipes at 32 px (seconds); CapFilt and the plot reuse the session's
tiny demo (conftest.py).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastblip.train import progress as pg

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1"), "OMP_NUM_THREADS": "2"}


def _cli(*args: str, timeout: int = 300, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``fastblip ARGS`` in a child process with stdout/stderr as pipes: not a terminal, like a redirected log."""
    return subprocess.run([sys.executable, "-m", "fastblip", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=ENV)


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def run_log(caplog):
    caplog.set_level(logging.INFO, logger=pg.RUN_LOG)
    return caplog


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == pg.RUN_LOG]


# ----------------------------------------------------------------------------- progress lines (no training)


def test_want_bar_only_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert pg.want_bar(True, Tty()) and not pg.want_bar(False, Tty())
    assert not pg.want_bar(True, io.StringIO())  # a redirected log: lines, no carriage-return frames


def test_train_lines_have_step_total_rate_eta_and_losses(run_log):
    clock = _Clock()
    p = pg.TrainProgress(100, 0, epochs=4, steps_per_epoch=25, bar=False, min_seconds=10.0, clock=clock)
    rec = {"itc_loss": 1.5, "itm_loss": 0.5, "loss": 2.0, "lr": 1e-3, "img_per_sec": 64.0, "epoch": 0,
           "data": {"ok": 10, "skipped": {}}}
    clock.t = 4.0  # the first step (compile, first batch) took 4 s; every later one takes 0.5 s
    p.update(1)
    for step in range(2, 101):
        clock.t += 0.5
        p.update(1)
        if step % 5 == 0:
            p.record({**rec, "step": step, "epoch": (step - 1) // 25})
    lines = _lines(run_log)
    # every 5 steps is every 2.5 s: throttled to one line per 10 s, the first and the last always
    assert 6 <= len(lines) <= 13, lines
    first = lines[0]
    assert first.startswith("train 5/100 steps (5%)") and "64.0 img/s" in first and "2 steps/s" in first
    # ETA from the steady rate (0.5 s/step, the slow first step excluded): 95 steps -> 47.5 s
    assert "ETA 0:48" in first or "ETA 0:47" in first, first
    assert "loss 2.0000 (itc 1.500 itm 0.500)" in first and "epoch 1/4" in first and "lr 1.00e-03" in first
    assert lines[-1].startswith("train 100/100 steps (100%)") and "ETA 0:00" in lines[-1]
    assert all("\r" not in ln for ln in lines)
    p.record({"eval": {"r_mean": 12.5, "txt_r1": 3.0}, "step": 100, "epoch": 3})
    assert _lines(run_log)[-1] == "eval at step 100 (epoch 4/4): r_mean 12.5 txt_r1 3"
    p.close()


def test_a_line_names_skipped_samples(run_log):
    p = pg.TrainProgress(10, 0, epochs=1, steps_per_epoch=10, bar=False, min_seconds=0)
    p.update(1)
    p.record({"loss": 1.0, "lr": 1e-4, "img_per_sec": 1.0, "epoch": 0, "step": 1,
              "data": {"ok": 3, "skipped": {"corrupt_image": 2}}})
    assert "skipped corrupt_image 2" in _lines(run_log)[-1]


def test_bar_mode_prints_notes_above_the_bar_not_through_logging(run_log, capsys):
    p = pg.Progress("train", 3, bar=True)
    p.update(1)
    assert p.show(["x"], {"loss": "1.0"}) is None  # postfix on the bar, no log line
    p.note("step 1: checkpoint written to x.pt")
    p.close()
    err = capsys.readouterr().err
    assert "checkpoint written" in err and not _lines(run_log)


def test_checkpoint_lines_can_be_left_out(run_log, tmp_path):
    """The demo writes a checkpoint per epoch of seconds: it sets CKPT_LOG above INFO and they are left out."""
    ck = tmp_path / "step-00000003.pt"
    ck.write_bytes(b"x" * 2**20)
    p = pg.TrainProgress(10, 0, epochs=1, steps_per_epoch=10, bar=False)
    p.checkpoint(ck, 3)
    assert _lines(run_log) == [f"step 3: checkpoint written to {ck} (1.0 MB)"]
    quiet = logging.getLogger(pg.CKPT_LOG)
    quiet.setLevel(logging.WARNING)
    try:
        p.checkpoint(ck, 3, exported=tmp_path / "model")
    finally:
        quiet.setLevel(logging.NOTSET)
    assert len(_lines(run_log)) == 1


def test_fmt_duration():
    assert [pg.fmt_duration(s) for s in (0, 7.4, 245, 3723, None, float("nan"))] == \
        ["0:00", "0:07", "4:05", "1:02:03", "?", "?"]


def test_tensorboard_purge_hides_what_a_killed_run_logged_past_its_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = pg.TensorBoardLog(tmp_path, purge_step=0)
    for s in range(1, 5):
        tb.record({"loss": float(s), "lr": 0.1, "step": s, "epoch": 0})
    tb.close()
    tb = pg.TensorBoardLog(tmp_path, purge_step=2)  # resumed from the step-2 checkpoint
    for s in (3, 4):
        tb.record({"loss": 10.0 * s, "lr": 0.1, "step": s, "epoch": 0})
    tb.record({"eval": {"r_mean": 40.0}, "step": 4, "epoch": 0})
    tb.close()
    ea = EventAccumulator(str(tmp_path))
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("train/loss")] == [(1, 1.0), (3, 30.0), (4, 40.0)]
    assert [(e.step, e.value) for e in ea.Scalars("eval/r_mean")] == [(4, 40.0)]
    pg.TensorBoardLog(tmp_path, purge_step=0).close()  # a new run starts a clean curve
    ea = EventAccumulator(str(tmp_path))
    ea.Reload()
    assert "train/loss" not in ea.Tags()["scalars"]


# ----------------------------------------------------------------------------- a real run, redirected


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from fastblip.data.synth import make_synthetic

    out = tmp_path_factory.mktemp("synth")
    make_synthetic(out, num=48, noise=0.0, seed=0, image_size=32, human=32, eval_num=8)
    return out


def _finetune_args(synth: Path, out: Path) -> list[str]:
    return ["finetune", "--recipe", str(ROOT / "recipes/finetune_retrieval_tiny_cpu.yaml"), "data.synthetic={}",
            f"data.train=[{synth}/human.json]", f"data.eval=[{synth}/eval.json]", "data.num_workers=0",
            "data.batch_size=4", "data.image_size=32", "model.config.queue_size=16", "model.config.vision.patch_size=8",
            f"train.out_dir={out}", "train.max_steps=6", "train.log_every=2", "train.ckpt_every=3",
            "train.tensorboard=true"]


def test_redirected_finetune_log_is_lines_with_checkpoints_and_recall(synth, tmp_path):
    """The tiny retrieval recipe (eval_every_epoch: false) ends with recall in its final metrics (was losses
    only); the redirected log has lines, no carriage returns, no library INFO; TensorBoard files beside
    log.jsonl hold the same losses and the recall."""
    out = tmp_path / "run"
    r = _cli(*_finetune_args(synth, out), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    err = r.stderr
    assert "\r" not in err
    assert " INFO " not in err and " DEBUG " not in err, err  # library INFO needs -v
    assert "train 2/6 steps (33%)" in err and "ETA" in err and "img/s" in err and "loss " in err
    assert "train 6/6 steps (100%)" in err
    assert f"step 3: checkpoint written to {out}/checkpoints/step-00000003.pt" in err
    assert f"model exported to {out}/model" in err
    assert "eval at step 6" in err and "r_mean" in err and "train finished at step 6/6" in err
    final = json.loads(r.stdout.strip().splitlines()[-1])
    assert 0.0 <= final["eval_r_mean"] <= 100.0 and {"eval_txt_r1", "eval_img_r1", "loss"} <= set(final)
    # every implementation choice of the run: one line at start, and the record in recipe.json
    assert err.count("fastblip finetune: backends: device=cpu attention=sdpa itc_loss=reference") == 1, err
    rec = json.loads((out / "recipe.json").read_text())["backends"]
    assert rec["compile"] == "off" and rec["amp"] == "fp32" and rec["ops"]["cross_attention"] == "reference"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "tensorboard"))
    ea.Reload()
    logged = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    train = [x for x in logged if "eval" not in x]
    assert [(e.step, round(e.value, 5)) for e in ea.Scalars("train/loss")] == [(x["step"], x["loss"]) for x in train]
    assert {"train/itc_loss", "train/itm_loss", "train/lr", "train/img_per_sec"} <= set(ea.Tags()["scalars"])
    assert ea.Scalars("eval/r_mean")[0].value == pytest.approx(final["eval_r_mean"])


def test_on_a_terminal_a_bar_and_messages_above_it(synth, tmp_path):
    """stderr a pseudo-terminal: tqdm's bar (carriage-return frames), no per-step lines; the checkpoint and
    evaluation messages are printed whole, above the bar."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a terminal 160 columns wide
    proc = subprocess.Popen([sys.executable, "-m", "fastblip", *_finetune_args(synth, tmp_path / "run")],
                            stdout=subprocess.PIPE, stderr=slave, cwd=ROOT, env=ENV)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 300)
        if not ready:
            proc.kill()
            break
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=60) == 0
    err = b"".join(chunks).decode(errors="replace")
    err = err.replace("\r\n", "\n")  # the terminal's newline translation; a bare \r is the bar's redraw
    assert "\rtrain: " in err and "6/6 [" in err  # the bar
    assert "train 2/6 steps" not in err  # no per-step lines on a terminal
    lines = err.replace("\r", "\n").splitlines()
    assert any(ln.startswith("step 3: checkpoint written to ") for ln in lines)
    assert any(ln.startswith("eval at step 6") for ln in lines)


def test_eval_at_end_off_gives_losses_only(synth, tmp_path):
    from fastblip.train.loop import Trainer
    from fastblip.train.recipe import read_recipe

    args = _finetune_args(synth, tmp_path / "run")
    recipe = read_recipe(args[2], args[3:] + ["train.eval_at_end=false", "train.tensorboard=false",
                                             "train.max_steps=2", "train.ckpt_every=0"])
    metrics = Trainer(recipe, progress=False).fit()
    assert not any(k.startswith("eval_") for k in metrics) and "loss" in metrics
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_library_info_only_with_verbose(tmp_path):
    """``-v`` shows the library's INFO (here: what an HF export leaves out); without it, none."""
    import fastblip
    from fastblip.config import tiny_config
    from fastblip.models import build_model

    torch.manual_seed(0)
    src = tmp_path / "retrieval"
    fastblip.save(build_model(tiny_config("retrieval")).eval(), src)
    quiet = _cli("convert", str(src), str(tmp_path / "hf1"), "--to", "hf")
    loud = _cli("-v", "convert", str(src), str(tmp_path / "hf2"), "--to", "hf")
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr + loud.stderr
    assert " INFO " not in quiet.stderr and "WARNING" not in quiet.stderr, quiet.stderr
    # the one line convert prints names what HF has no place for, as what it is
    assert "left out training-only tensors HF has no place for: " in quiet.stderr and "temp" in quiet.stderr
    assert "INFO fastblip: HF BlipForImageTextRetrieval export leaves out training-only tensors" in loud.stderr


def test_setup_logging_levels_and_run_line_format():
    from fastblip.cli import _Format, setup_logging

    lg, run = logging.getLogger("fastblip"), logging.getLogger(pg.RUN_LOG)
    before = lg.level, run.level
    try:
        setup_logging(False)
        assert lg.getEffectiveLevel() == logging.WARNING and run.getEffectiveLevel() == logging.INFO
        assert not logging.getLogger("fastblip.train").isEnabledFor(logging.INFO)
        setup_logging(True)
        assert logging.getLogger("fastblip.train").isEnabledFor(logging.DEBUG)
    finally:
        lg.setLevel(before[0])
        run.setLevel(before[1])
    f = _Format("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    mk = lambda name, lvl: logging.LogRecord(name, lvl, __file__, 1, "hello %d", (1,), None)  # noqa: E731
    assert f.format(mk(pg.RUN_LOG, logging.INFO)).endswith(" hello 1")
    assert "INFO" not in f.format(mk(pg.RUN_LOG, logging.INFO))
    assert "WARNING fastblip.data: hello 1" in f.format(mk("fastblip.data", logging.WARNING))


# ----------------------------------------------------------------------------- init_from messages


def test_init_from_drops_are_reported_as_what_they_are(caplog):
    """A caption model from a pretraining checkpoint leaves out 156 tensors (text encoder, ITM head, queues):
    expected, so an INFO line of the run saying so, no warning. A shape mismatch is a warning."""
    from fastblip.config import tiny_config
    from fastblip.models import build_model
    from fastblip.train.init import load_matching, report_init_from

    caplog.set_level(logging.INFO)
    torch.manual_seed(0)
    sd = build_model(tiny_config("pretrain")).state_dict()
    cap = build_model(tiny_config("caption"))
    report_init_from("pre.pt", cap.kind, load_matching(cap, sd))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    msg = _lines(caplog)[-1]
    assert msg.startswith("init_from pre.pt: loaded ") and "of parts a caption model does not have, not used" in msg
    assert "text_encoder.*" in msg and "dropped" not in msg
    caplog.clear()
    bad = dict(sd)
    bad["visual_encoder.patch_embed.proj.weight"] = torch.zeros(3, 3)
    report_init_from("pre.pt", cap.kind, load_matching(cap, bad))
    warn = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warn) == 1 and "another shape" in warn[0] and "patch_embed" in warn[0]


# ----------------------------------------------------------------------------- CapFilt metrics


def test_capfilt_totals_hold_precision_recall_and_score_statistics(tiny_demo):
    """totals.json's filter quality equals the demo's own count over the scores files; the score statistics
    equal those of the scores themselves (mean/sd/min/max to rounding, quantiles to the 0.01 bins)."""
    import numpy as np

    out, report = tiny_demo
    totals = json.loads((out / "capfilt" / "totals.json").read_text())
    f, mine = report["filter"], totals["filter"]
    assert mine is not None and mine["labelled_web_texts"] == f["web_texts"]
    for k in ("noise_rate", "precision", "recall", "kept_clean_fraction"):
        assert mine[k] == pytest.approx(f[k], abs=1e-4), k
    scores: dict[str, list[float]] = {"web": [], "synthetic": []}
    for p in sorted((out / "capfilt").glob("*.scores.jsonl")):
        for line in p.read_text().splitlines():
            for t in json.loads(line)["texts"]:
                scores["web" if t["source"] == "web" else "synthetic"].append(t["itm_score"])
    for src, vals in scores.items():
        st, v = totals["itm_scores"][src], np.asarray(vals)
        assert st["n"] == len(vals)
        assert st["mean"] == pytest.approx(v.mean(), abs=1e-4) and st["sd"] == pytest.approx(v.std(), abs=1e-3)
        assert st["min"] == pytest.approx(v.min(), abs=1e-4) and st["max"] == pytest.approx(v.max(), abs=1e-4)
        for q in (10, 50, 90):  # from a 100-bin histogram, linear inside a bin: within one bin width
            assert abs(st[f"p{q}"] - np.quantile(v, q / 100)) <= 0.01, (src, q)


def test_capfilt_summary_without_and_with_labels(tiny_demo):
    from fastblip.capfilt.pipeline import format_totals

    out, _ = tiny_demo
    totals = json.loads((out / "capfilt" / "totals.json").read_text())
    text = format_totals(totals, out / "capfilt")
    f = totals["filter"]
    assert f"precision {f['precision']:.3f}, recall {f['recall']:.3f}" in text
    assert "web texts: kept" in text and "ITM match probability mean" in text and "p10/p50/p90" in text
    unlabelled = {**totals, "filter": None}
    assert "no noise labels" in format_totals(unlabelled, out / "capfilt")


def test_capfilt_cli_prints_metrics_and_running_kept_counts(tiny_demo, tmp_path):
    """Two shards through the CLI with ``--device cpu``, redirected: a line per shard with the kept counts
    *so far* (the bar showed the last shard's), and the summary with precision/recall and score stats."""
    demo_dir, _ = tiny_demo
    shards = sorted((demo_dir / "data" / "web").glob("*.tar"))[:2]
    out = tmp_path / "boot"
    r = _cli("capfilt", "--recipe", str(ROOT / "recipes/capfilt_tiny_cpu.yaml"),
             f"captioner={demo_dir / 'captioner' / 'model'}", f"filter={demo_dir / 'filter' / 'model'}",
             f"input={'::'.join(map(str, shards))}", f"output={out}", "num_captions=1", "num_workers=1",
             "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "\r" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if " capfilt " in f" {ln} " and "shards (" in ln]
    assert len(lines) == 2 and "capfilt 1/2 shards (50%)" in lines[0] and "capfilt 2/2 shards (100%)" in lines[1]
    totals = json.loads((out / "totals.json").read_text())
    w, s = totals["web"], totals["synthetic"]
    assert f"kept web {w['kept']}/{w['kept'] + w['dropped']}" in lines[1]
    assert f"synthetic {s['kept']}/{s['kept'] + s['dropped']}" in lines[1]
    assert f"precision {totals['filter']['precision']:.3f}" in r.stdout and "ITM match probability" in r.stdout
    assert json.loads((out / "capfilt.json").read_text())["settings"]["dtype"] == "fp32"


# ----------------------------------------------------------------------------- the report plot


def _figure(report: dict, path: Path):
    """The demo's figure, kept open for inspection (``_plot`` closes it after saving)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastblip import demo

    figs = []
    real_close = plt.close
    plt.close = lambda fig=None: figs.append(fig)
    try:
        demo._plot(report, path)
    finally:
        plt.close = real_close
    return figs[0]


def test_report_plot_axes_legend_and_labels(tiny_demo, tmp_path):
    """Separate axes per metric family (R@k %, BLEU-4 0-1, CIDEr, filter fractions), r_mean and the filter's
    precision/recall shown, one legend with the table's run names that covers no bar, the loss panel saying
    its curves are not comparable."""
    from matplotlib.patches import Rectangle

    from fastblip.demo import AFTER, BEFORE, _table

    out, report = tiny_demo
    fig = _figure(report, tmp_path / "report.png")
    fig.canvas.draw()
    axes = {ax.get_ylabel(): ax for ax in fig.axes}
    assert "recall (%)" in axes and "fraction (0-1)" in axes and "training loss (itc + itm + lm)" in axes
    ret = axes["recall (%)"]
    assert [t.get_text() for t in ret.get_xticklabels()] == ["txt_r1", "txt_r5", "img_r1", "img_r5", "r_mean"]
    if report["caption_metrics"]:
        assert "BLEU-4 (0-1)" in axes and "CIDEr" in axes  # not on the recall axis, where 0.2 was invisible
    filt = axes["fraction (0-1)"]
    assert [t.get_text() for t in filt.get_xticklabels()][:2] == ["precision", "recall"]
    heights = [p.get_height() for p in filt.patches if isinstance(p, Rectangle)]
    assert report["filter"]["precision"] in [pytest.approx(h) for h in heights]
    assert "not comparable" in axes["training loss (itc + itm + lm)"].get_title()
    # one legend, the table's names, clear of every bar
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [BEFORE, AFTER]
    assert BEFORE in _table(report) and AFTER in _table(report)
    renderer = fig.canvas.get_renderer()
    box = legend.get_window_extent(renderer)
    for ax in fig.axes:
        assert ax.get_legend() is None or ax is filt  # the filter's own key (noise rate) is its only other legend
        for patch in ax.patches:
            assert not box.overlaps(patch.get_window_extent(renderer)), ax.get_ylabel()
    if filt.get_legend() is not None:
        fbox = filt.get_legend().get_window_extent(renderer)
        assert not any(fbox.overlaps(p.get_window_extent(renderer)) for p in filt.patches)
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_demo_reports_each_training_stage_speed(tiny_demo):
    """The figure a user compares with the README's idle-core numbers: steps/s of each training stage."""
    _, report = tiny_demo
    speed = report["train_speed"]
    assert set(speed) == {"pretrain on human + noisy web", "finetune captioner", "finetune filter",
                          "pretrain on bootstrapped set"}
    assert speed["pretrain on human + noisy web"]["steps"] == report["pretrain_steps"]
    for name, r in speed.items():
        assert r["steps"] > 0 and r["seconds"] > 0, name
        assert r["steps_per_sec"] == pytest.approx(r["steps"] / r["seconds"], rel=1e-2)
        assert r["images_per_sec"] == pytest.approx(32 * r["steps_per_sec"], rel=1e-2)
        assert r["seconds"] <= report["seconds"][name]  # fit only, within the stage's wall time


def test_demo_help_has_no_rst_marks():
    from fastblip.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "verb")
    text = sub.choices["demo"].format_help()
    assert "``" not in text and "report.json" in text


# ----------------------------------------------------------------------------- CLI rough edges


def test_data_errors_name_the_command(tmp_path, capsys):
    from fastblip.cli import main

    assert main(["data", "synth", "--out", str(tmp_path / "d"), "--num", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastblip data synth: error: need num >= 1") and "data synth: need" not in err
    assert main(["data", "check", str(tmp_path / "missing.tar")]) == 1
    assert capsys.readouterr().err.startswith("fastblip data check: error: ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a GPU this machine lacks")
@pytest.mark.parametrize("verb", ["eval", "capfilt"])
def test_eval_and_capfilt_take_device(verb, tmp_path, capsys):
    from fastblip.cli import build_parser, main

    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    assert "--device" in sub.choices[verb].format_help()
    ck = tmp_path / "ck"
    ck.mkdir()
    if verb == "eval":
        argv = ["eval", "--recipe", str(ROOT / "recipes/finetune_retrieval_tiny_cpu.yaml"),
                f"model.init_from={ck}", "--device", "cuda"]
    else:
        shard = tmp_path / "web-00000.tar"
        import tarfile

        with tarfile.open(shard, "w"):
            pass
        argv = ["capfilt", f"captioner={ck}", f"filter={ck}", f"input={shard}", f"output={tmp_path / 'o'}",
                "--device", "cuda"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fastblip {verb}: error: device 'cuda': no CUDA GPU"), err


# ----------------------------------------------------------------------------- checkpoints


def test_convert_to_official_adds_pth_and_files_are_0644(tmp_path, capsys):
    import stat

    import fastblip
    from fastblip.cli import main
    from fastblip.config import tiny_config
    from fastblip.models import build_model

    torch.manual_seed(0)
    src = tmp_path / "src"
    fastblip.save(build_model(tiny_config("retrieval")).eval(), src)
    assert main(["convert", str(src), str(tmp_path / "official"), "--to", "official"]) == 0
    assert (tmp_path / "official.pth").is_file() and not (tmp_path / "official").exists()
    assert f"to {tmp_path / 'official.pth'}" in capsys.readouterr().err
    assert main(["convert", str(src), str(tmp_path / "keep.pt"), "--to", "official"]) == 0
    assert (tmp_path / "keep.pt").is_file()
    assert main(["convert", str(tmp_path / "official.pth"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    umask = os.umask(0o022)
    os.umask(umask)
    want = 0o666 & ~umask
    for d in (src, tmp_path / "hf"):
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in d.iterdir() if p.is_file()}
        assert modes["model.safetensors"] == want and len(set(modes.values())) == 1, (d, modes)


# ----------------------------------------------------------------------------- benchmarks


def test_benchmark_results_have_no_nan(tmp_path):
    from benchmarks.common import markdown_table, write_results

    rows = [{"suite": "kernels", "impl": "triton", "ms_median": 1.5, "peak_mem_mb": float("nan")},
            {"suite": "kernels", "impl": "reference", "ms_median": float("nan"), "peak_mem_mb": None,
             "error": "RuntimeError: x"}]
    path = write_results("kernels", rows, {"date": "2026-01-01 00:00 UTC", "device": "cpu"}, "tiny", out_dir=tmp_path)
    text = path.read_text()
    assert "NaN" not in text and json.loads(text)["rows"][0]["peak_mem_mb"] is None  # valid JSON
    table = markdown_table(rows)
    assert "nan" not in table.lower() and "n/a (CUDA only)" in table
    assert math.isnan(rows[0]["peak_mem_mb"])  # the caller's rows are not modified


def test_benchmarks_run_from_any_directory_and_interpret_on_cpu(tmp_path):
    from benchmarks.__main__ import interpret_on_cpu

    env: dict = {}
    assert interpret_on_cpu("cpu", env) and env == {"TRITON_INTERPRET": "1"}
    assert not interpret_on_cpu("cpu", {"TRITON_INTERPRET": "0"}) and not interpret_on_cpu("cuda", {})
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks"), "--help"], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path, env={k: v for k, v in ENV.items() if k != "PYTHONPATH"})
    assert r.returncode == 0 and "python -m benchmarks" in r.stdout, r.stderr[-2000:]

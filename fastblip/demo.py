"""``fastblip demo``: BLIP's bootstrapping gain in miniature, on built-in synthetic data, on a CPU.

1. draw a synthetic dataset: a noisy "web" split (~40% wrong captions), a clean "human" split, an eval split;
2. pretrain a tiny BLIP on human + web;
3. finetune a captioner (LM, "a picture of " prompt) and a filter (ITC + ITM) on the human split;
4. CapFilt the web split: one nucleus-sampled synthetic caption per image, ITM-filter web and synthetic texts;
5. pretrain a new tiny BLIP, for the same number of steps, on human + filtered web + filtered synthetic;
6. evaluate both pretrained models on the eval split: retrieval R@1/R@5 both ways (ITC + ITM re-ranking) and,
   with the ``eval`` extra, BLEU-4 / CIDEr of their captions;
7. print the before/after table and the filter's precision/recall against the known noise, write
   ``report.json`` and ``report.png`` (retrieval recall, caption metrics and the filter on their own axes, and
   each pretraining run's loss on its own data), and the CapFilt viewer (``capfilt/view/index.html``).

Every figure in the report is what this run measured; nothing is asserted into it.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("fastblip.demo")


@dataclass(frozen=True)
class Budget:
    web: int  # web images (40% noisy captions)
    human: int  # clean human-annotated images
    eval: int  # eval images
    pre_epochs: int  # pretraining epochs over human + web
    cap_epochs: int  # captioner finetuning epochs over human
    filt_epochs: int  # filter finetuning epochs over human
    batch: int = 32


BUDGETS = {
    "tiny": Budget(web=400, human=300, eval=100, pre_epochs=10, cap_epochs=4, filt_epochs=20),
    "small": Budget(web=1200, human=800, eval=200, pre_epochs=8, cap_epochs=8, filt_epochs=15),
    "medium": Budget(web=4000, human=2500, eval=400, pre_epochs=12, cap_epochs=10, filt_epochs=15),
}
NOISE = 0.4
IMAGE = 64  # model input size = the synthetic images' size; patch 16 gives the tiny ViT 16 patches + [CLS]
# (measured: at 32 px / patch 8, the same 17 tokens, an in-batch contrastive loss was 2.7 after 120 steps
# against 2.1 at 64 px / patch 16: the shapes are only a few pixels wide at 32 px)
# How a width-64 BLIP learns anything in CPU minutes (measured on this set, 2 cores, 2026-11-23):
# - random-init scale: with the official std 0.02 at width 64, every [CLS] feature is the same vector at init
#   (pairwise cosine 1.000 text, 0.98 image): attention and MLP add ~σ²·width ≈ 0.03 of the residual per layer
#   (≈ 0.3 at BERT-base width). ITC then has nothing to pull apart and collapses every feature onto one
#   direction. σ = 1/√width (text) and 2/√width (vision) start at cosine 0.92 / 0.84;
# - queue 32 = one batch: the official queue starts as random unit vectors, and pushing features away from them
#   is the cheapest early gain, so a 128-entry queue collapsed the tiny model in 20 steps where 32 did not;
# - no flip and crops ≥ 0.9 of the image: the captions say "left"/"right" and name every shape;
# - lr 2e-3 (pretrain, filter) with a 10-step warmup: retrieval leaves chance after ~100 steps instead of ~200.
# All are recipe values; the model code is the official computation.
TEXT_INIT_STD, VISION_INIT_STD = 0.125, 0.25
PRETRAIN_LR = FILTER_LR = 2e-3


def _recipe(task: str, out: Path, train: list, eval_: list, epochs: int, bs: int, *, lr: float = 1e-3,
            schedule: str = "step", init_from: str | None = None, prompt: str = "", max_steps: int = 0,
            batches_per_epoch: int | None = None, queue: int = 32, alpha_ramp: float = 2.0,
            resampled: bool = False):
    from fastblip.train.recipe import DataSection, ModelSection, Recipe, TrainSection

    return Recipe(
        task=task,
        # no dropout: a tiny model trained from scratch for minutes needs every step (measured: with dropout 0.1
        # an in-batch contrastive loss sat at chance ~40 steps longer on the synthetic set)
        model=ModelSection(preset="tiny", init_from=init_from,
                           config={"queue_size": queue, "vision": {"patch_size": 16, "init_std": VISION_INIT_STD},
                                   "text": {"hidden_dropout": 0.0, "attention_dropout": 0.0,
                                            "initializer_range": TEXT_INIT_STD}}),
        data=DataSection(train=train, eval=eval_, image_size=IMAGE, batch_size=bs, num_workers=1, max_words=30,
                         max_length=35 if task != "pretrain" else 30, min_scale=0.9, randaugment=False, hflip=False,
                         prompt=prompt, resampled=resampled, batches_per_epoch=batches_per_epoch),
        train=TrainSection(epochs=epochs, max_steps=max_steps, lr=lr, min_lr=1e-5, warmup_steps=10, warmup_lr=1e-5,
                           schedule=schedule, alpha=0.4, alpha_ramp_epochs=alpha_ramp, seed=42, log_every=5,
                           keep_last=1, eval_every_epoch=False, eval_at_end=False, out_dir=str(out)),
        task_options={},
    )


def _train(recipe, progress: bool):
    from fastblip.train.loop import Trainer

    tr = Trainer(recipe, progress=progress, overwrite=True)  # a rerun of the demo replaces its own stage
    t0 = time.perf_counter()
    tr.fit()
    ckpts = sorted((Path(recipe.train.out_dir) / "checkpoints").glob("*.pt"))
    return tr.model.eval(), str(ckpts[-1]) if ckpts else None, tr.total_steps, time.perf_counter() - t0


def _rate(steps: int, seconds: float, batch: int) -> dict:
    """A training stage's speed, the figure a user compares with the README's (measured on idle cores)."""
    sps = steps / seconds if seconds > 0 else 0.0
    return {"steps": steps, "seconds": round(seconds, 2), "steps_per_sec": round(sps, 3),
            "images_per_sec": round(sps * batch, 1)}


def _losses(run_dir: Path) -> list[dict]:
    p = run_dir / "log.jsonl"
    if not p.is_file():
        return []
    rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r and "eval" not in r]


def _evaluate(model, eval_json: str, with_captions: bool) -> dict:
    from fastblip.data.loader import build_loader
    from fastblip.eval.retrieval import evaluate_retrieval

    loader = build_loader([eval_json], image_size=IMAGE, batch_size=64, train=False, num_workers=0)
    out = evaluate_retrieval(model, loader, k_test=16)
    if with_captions:
        from fastblip.eval.caption_metrics import evaluate_captions

        loader = build_loader([eval_json], image_size=IMAGE, batch_size=64, train=False, num_workers=0)
        out.update(evaluate_captions(model, loader, prompt=""))  # pretraining decoder: no prompt
    return out


def _filter_quality(capfilt_dir: Path) -> dict:
    """Precision/recall of the filter at *removing noisy web captions*, against the synthetic noise labels."""
    tp = fp = fn = tn = 0
    syn_total = syn_kept = 0
    for p in sorted(capfilt_dir.glob("*.scores.jsonl")):
        for line in p.read_text().splitlines():
            rec = json.loads(line)
            for t in rec["texts"]:
                if t["source"] == "web":
                    noisy, dropped = bool(rec.get("noisy")), not t["kept"]
                    tp += noisy and dropped
                    fp += (not noisy) and dropped
                    fn += noisy and not dropped
                    tn += (not noisy) and not dropped
                else:
                    syn_total += 1
                    syn_kept += t["kept"]
    n = tp + fp + fn + tn
    return {"web_texts": n, "noise_rate": (tp + fn) / n if n else None,
            "precision": tp / (tp + fp) if tp + fp else None, "recall": tp / (tp + fn) if tp + fn else None,
            "web_kept": fn + tn, "web_dropped": tp + fp, "kept_clean_fraction": tn / (tn + fn) if tn + fn else None,
            "synthetic": syn_total, "synthetic_kept": syn_kept}


def _has_caption_metrics() -> bool:
    try:
        from fastblip.eval.caption_metrics import _scorers

        _scorers()
        return True
    except ImportError:
        return False


# one name per run everywhere (table, plot legends, report keys of the loss curves map onto them)
BEFORE = "pretrained on human + noisy web"
AFTER = "pretrained on the bootstrapped set"
CURVE_LABELS = {"human + noisy web": BEFORE, "bootstrapped": AFTER}
RETRIEVAL_KEYS = ("txt_r1", "txt_r5", "img_r1", "img_r5", "r_mean")


def _bars(ax, keys: list[str], report: dict, fmt: str) -> None:
    """Before/after bars of ``keys`` with their values written on them (small differences stay readable)."""
    x = range(len(keys))
    for off, side, label, color in ((-0.2, "before", BEFORE, "tab:gray"), (0.2, "after", AFTER, "tab:blue")):
        vals = [report[side][k] for k in keys]
        bars = ax.bar([i + off for i in x], vals, width=0.4, label=label, color=color)
        ax.bar_label(bars, labels=[fmt.format(v) for v in vals], fontsize=7, padding=1)
    ax.set_xticks(list(x), keys)
    ax.margins(y=0.15)


def _plot(report: dict, path: Path) -> None:
    """report.png: the pretraining losses (each on its own data), retrieval recall, BLEU-4 and CIDEr, and the
    filter, each on its own axis; one legend for the two runs."""
    quiet = logging.getLogger("matplotlib")  # "building the font cache" on a first run, font fallbacks
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        caption = "bleu4" in report["before"]
        fig = plt.figure(figsize=(13, 8))
        outer = fig.add_gridspec(2, 1)
        row1 = outer[0].subgridspec(1, 2, width_ratios=(2, 1))
        row2 = outer[1].subgridspec(1, 3, width_ratios=(3, 1, 1)) if caption else outer[1].subgridspec(1, 1)
        ax_loss, ax_filter = fig.add_subplot(row1[0]), fig.add_subplot(row1[1])
        ax_ret = fig.add_subplot(row2[0])
        for name, curve in report["loss_curves"].items():
            if curve:
                ax_loss.plot([r["step"] for r in curve], [r["loss"] for r in curve],
                             label=CURVE_LABELS.get(name, name), color="tab:gray" if name != "bootstrapped"
                             else "tab:blue")
        ax_loss.set_xlabel("optimiser step")
        ax_loss.set_ylabel("training loss (itc + itm + lm)")
        ax_loss.set_title("pretraining loss, each run on its own training data: not comparable across the runs\n"
                          "(the bootstrapped set holds fewer wrong captions, so its loss is lower for that reason too)",
                          fontsize=9)

        _bars(ax_ret, list(RETRIEVAL_KEYS), report, "{:.1f}")
        ax_ret.set_ylabel("recall (%)")
        ax_ret.set_ylim(0, 100)
        ax_ret.set_title("retrieval on the eval split (R@k; r_mean: mean of R@1/5/10 both ways)", fontsize=9)
        if caption:
            ax_bleu, ax_cider = fig.add_subplot(row2[1]), fig.add_subplot(row2[2])
            _bars(ax_bleu, ["bleu4"], report, "{:.3f}")
            ax_bleu.set_ylabel("BLEU-4 (0-1)")
            ax_bleu.set_title("captions: BLEU-4", fontsize=9)
            _bars(ax_cider, ["cider"], report, "{:.3f}")
            ax_cider.set_ylabel("CIDEr")
            ax_cider.set_title("captions: CIDEr", fontsize=9)

        f = report["filter"]
        names = [("precision", "precision"), ("recall", "recall"), ("kept_clean_fraction", "clean among kept")]
        shown = [(label, f[k]) for k, label in names if f.get(k) is not None]
        if shown:
            bars = ax_filter.bar([n for n, _ in shown], [v for _, v in shown], color="tab:green")
            ax_filter.bar_label(bars, labels=[f"{v:.3f}" for _, v in shown], fontsize=7, padding=1)
        if f.get("noise_rate") is not None:
            ax_filter.axhline(f["noise_rate"], color="tab:red", ls="--", lw=1,
                              label=f"noise rate {f['noise_rate']:.2f} (precision of a random filter)")
            ax_filter.legend(loc="upper center", fontsize=7)
        ax_filter.set_ylim(0, 1.25)
        ax_filter.set_ylabel("fraction (0-1)")
        ax_filter.set_title(f"CapFilt filter on {f['web_texts']} web captions\n(dropping the noisy ones)",
                            fontsize=9)

        handles, labels = ax_ret.get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", ncol=2, frameon=False)
        fig.tight_layout(rect=(0, 0, 1, 0.95))
        fig.savefig(path, dpi=110)
        plt.close(fig)
    finally:
        quiet.setLevel(level)


def _table(report: dict) -> str:
    b, a = report["before"], report["after"]
    lines = [f"| metric | {BEFORE} | {AFTER} |", "|---|---:|---:|"]
    for k in ("txt_r1", "txt_r5", "img_r1", "img_r5", "r_mean", "bleu4", "cider"):
        if k in b:
            lines.append(f"| {k} | {b[k]:.2f} | {a[k]:.2f} |")
    f = report["filter"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    lines += ["", f"filter on web captions: noise rate {fmt(f['noise_rate'])}, precision {fmt(f['precision'])}, "
              f"recall {fmt(f['recall'])} (of {f['web_texts']} web texts, {f['web_dropped']} dropped); "
              f"synthetic captions kept {f['synthetic_kept']}/{f['synthetic']}"]
    return "\n".join(lines)


def run_demo(out: str | Path = "demo_out", budget: str = "small", seed: int = 0, progress: bool = True) -> dict:
    """Run the whole bootstrapping demo; returns the report (also written to ``out/report.json``)."""
    from fastblip.errors import ConfigError
    from fastblip.train.rundir import acquire_lock

    if budget not in BUDGETS:
        raise ConfigError(f"unknown budget '{budget}' (valid: {', '.join(BUDGETS)})")
    bud, out = BUDGETS[budget], Path(out)
    # the demo owns --out while it runs (a second demo into it is refused); a rerun replaces every stage's output
    # knowingly: each stage overwrites its own directory (Trainer/CapFilt overwrite=True)
    lock = acquire_lock(out, "demo", "demo --out")
    from fastblip.train.progress import CKPT_LOG

    ckpt_log = logging.getLogger(CKPT_LOG)
    level = ckpt_log.level
    ckpt_log.setLevel(logging.WARNING)  # a checkpoint per epoch of seconds: ~60 lines that say nothing here
    try:
        return _run_demo(out, bud, budget, seed, progress)
    finally:
        ckpt_log.setLevel(level)
        lock.release()


def _run_demo(out: Path, bud: Budget, budget: str, seed: int, progress: bool) -> dict:
    from fastblip.capfilt.pipeline import run_capfilt
    from fastblip.capfilt.recipe import CapfiltRecipe
    from fastblip.data.synth import make_synthetic
    from fastblip.train.rundir import atomic_write_text

    torch.manual_seed(seed)
    t_start, timings = time.perf_counter(), {}

    rates: dict[str, dict] = {}

    def stage(name: str, trained: tuple | None = None):
        timings[name] = round(time.perf_counter() - t_start - sum(timings.values()), 2)
        speed = ""
        if trained is not None:  # (steps, seconds of fit): a number to compare with the README's idle-core figure
            r = rates[name] = _rate(*trained, bud.batch)
            speed = f"; {r['steps']} steps at {r['steps_per_sec']:.2f} steps/s, {r['images_per_sec']:.0f} img/s"
        print(f"[demo] {name} done ({timings[name]:.1f} s{speed})", flush=True)

    data = make_synthetic(out / "data", bud.web, NOISE, seed, image_size=64, human=bud.human, eval_num=bud.eval,
                          shard_size=64)
    stage("synthetic data")
    web_json, human_json, eval_json = data["web_json"], data["human_json"], data["eval_json"]

    pre1, pre1_ckpt, steps, secs = _train(_recipe("pretrain", out / "pretrain_noisy", [human_json, web_json],
                                                  [eval_json], bud.pre_epochs, bud.batch, lr=PRETRAIN_LR), progress)
    stage("pretrain on human + noisy web", (steps, secs))
    cap, _, n, secs = _train(_recipe("caption", out / "captioner", [human_json], [eval_json], bud.cap_epochs,
                                     bud.batch, schedule="cosine", init_from=pre1_ckpt, prompt="a picture of "),
                             progress)
    stage("finetune captioner", (n, secs))
    filt, _, n, secs = _train(_recipe("retrieval", out / "filter", [human_json], [eval_json], bud.filt_epochs,
                                      bud.batch, schedule="cosine", init_from=pre1_ckpt, alpha_ramp=1.0,
                                      lr=FILTER_LR), progress)
    stage("finetune filter", (n, secs))

    boot = out / "capfilt"
    cf = CapfiltRecipe(input=data["web"], output=str(boot), num_captions=1, method="nucleus", image_size=IMAGE, batch_size=64,
                       seed=seed, device="cpu", dtype="fp32", num_workers=1, max_length=20, progress=progress)
    cf_stats = run_capfilt(cf, captioner=cap, filter_model=filt, device="cpu", overwrite=True)
    from fastblip.capfilt.pipeline import collect, expand_input

    totals = collect(boot, expand_input(cf.input))
    stage("capfilt")

    # the same optimiser steps and lr schedule as the first pretraining: its steps per epoch, drawn with
    # replacement from human + filtered web + filtered synthetic (the bootstrapped set is smaller than human + web)
    boot_sources = [human_json] + sorted(str(p) for p in boot.glob("*.tar"))
    pre2, _, n, secs = _train(_recipe("pretrain", out / "pretrain_boot", boot_sources, [eval_json], bud.pre_epochs,
                                      bud.batch, lr=PRETRAIN_LR, max_steps=steps,
                                      batches_per_epoch=max(1, steps // bud.pre_epochs), resampled=True), progress)
    stage("pretrain on bootstrapped set", (n, secs))

    captions = _has_caption_metrics()
    report = {
        "budget": budget, "seed": seed, "noise": NOISE,
        "data": {"web": bud.web, "human": bud.human, "eval": bud.eval, "bootstrapped_pairs": totals["pairs"]},
        "capfilt": {"totals": totals, "images_per_sec": cf_stats["images_per_sec"]},
        "filter": _filter_quality(boot),
        "before": _evaluate(pre1, eval_json, captions),
        "after": _evaluate(pre2, eval_json, captions),
        "caption_metrics": captions,
        "loss_curves": {"human + noisy web": _losses(out / "pretrain_noisy"),
                        "bootstrapped": _losses(out / "pretrain_boot")},
        "pretrain_steps": steps,
    }
    stage("evaluation")
    report["seconds"] = timings
    report["train_speed"] = rates  # per training stage: steps, seconds of fit, steps/s, img/s (batch 32)
    from fastblip.capfilt.viewer import build_view  # the bootstrapped data as browsable HTML (~1 s)

    report["capfilt"]["viewer"] = build_view(boot)["index"]
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    _plot(report, out / "report.png")
    print("\n" + _table(report) + f"\n\nwrote {out / 'report.json'} and {out / 'report.png'}", flush=True)
    print(f"CapFilt viewer (web and synthetic captions, scores, verdicts): {report['capfilt']['viewer']}", flush=True)
    return report


def add_parsers(sub) -> None:
    p = sub.add_parser("demo", help="BLIP's bootstrapping gain in miniature on synthetic data (CPU, minutes)",
                       description=re.sub(r"``([^`]+)``", r"\1", __doc__),  # the docstring's RST marks, not --help's
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="output directory (default demo_out)")
    p.add_argument("--budget", default="small", choices=tuple(BUDGETS), help="tiny (CI), small (default), medium")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the report as JSON at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or per-step lines: only a line "
                   "per stage and the report")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    if args.no_progress:  # the training stages' lines (fastblip.run): a bar on a terminal, else one per 10 s
        from fastblip.train.progress import RUN_LOG

        logging.getLogger(RUN_LOG).setLevel(logging.WARNING)
    report = run_demo(args.out, args.budget, args.seed, progress=not args.no_progress)
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "loss_curves"}))
    return 0

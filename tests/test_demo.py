"""`fastblip demo --budget tiny` end to end: every stage runs, the report is complete and consistent, and the
filter it trained removes noisy web captions better than chance.

The figures in the report are whatever the run measured; these tests check the report's structure, the
consistency of its counts with the files CapFilt wrote, and the one claim the issue asks of the tiny budget:
the filter's precision beats the noise base rate. (The run is the session fixture ``tiny_demo``, conftest.py.)
"""

import json
import math

import pytest

from fastblip.demo import BUDGETS, NOISE


@pytest.fixture(scope="module")
def demo(tiny_demo):
    return tiny_demo


def test_report_files_and_structure(demo):
    out, report = demo
    assert (out / "report.png").stat().st_size > 1000
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["budget"] == "tiny" and on_disk["filter"] == report["filter"]
    for side in ("before", "after"):
        for k in ("txt_r1", "txt_r5", "img_r1", "img_r5", "r_mean"):
            assert 0.0 <= report[side][k] <= 100.0
        if report["caption_metrics"]:
            assert math.isfinite(report[side]["bleu4"]) and math.isfinite(report[side]["cider"])
    for curve in report["loss_curves"].values():
        assert curve and all(math.isfinite(r["loss"]) for r in curve)
    assert set(report["seconds"]) >= {"synthetic data", "capfilt", "evaluation"}


def test_filter_counts_match_capfilt_output(demo):
    out, report = demo
    b, f = BUDGETS["tiny"], report["filter"]
    assert f["web_texts"] == b.web  # one web text per web image, every one scored
    assert f["web_kept"] + f["web_dropped"] == b.web
    assert f["synthetic"] == b.web  # one nucleus-sampled caption per web image
    assert abs(f["noise_rate"] - NOISE) < 0.1
    totals = report["capfilt"]["totals"]
    assert totals["web"]["kept"] == f["web_kept"] and totals["synthetic"]["kept"] == f["synthetic_kept"]
    # the bootstrapped set = kept web + kept synthetic pairs, each written as a sample of the output shards
    assert report["data"]["bootstrapped_pairs"] == f["web_kept"] + f["synthetic_kept"]
    if f["precision"] is not None:
        assert 0.0 <= f["precision"] <= 1.0 and 0.0 <= f["recall"] <= 1.0


def test_filter_precision_beats_noise_base_rate(demo):
    """Dropping web texts at random has precision = the noise rate (0.4); the tiny filter must beat it by a
    margin (measured on 2 CPU cores, 2026-11-23: precision 0.519, recall 0.919)."""
    f = demo[1]["filter"]
    assert f["precision"] is not None and f["precision"] >= f["noise_rate"] + 0.05, f
    assert f["recall"] >= 0.5, f
    assert f["kept_clean_fraction"] > 1.0 - f["noise_rate"], f  # the kept web texts are cleaner than the input

"""`fastblip demo --budget tiny` end to end: every stage runs and the report is complete and consistent.

The figures in the report are whatever the run measured; this test checks the report's structure and the
consistency of its counts with the files CapFilt wrote, not how good a minute-long tiny model is.
"""

import json
import math

import pytest

from fastblip.demo import BUDGETS, NOISE, run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, "tiny", seed=0, progress=False)


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

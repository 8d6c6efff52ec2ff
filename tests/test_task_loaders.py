"""One data pipeline for every task (issue 16.2): VQA, NLVR2 and video read through the same stream as
pretraining (fastblip.data.open_loader with a sample format), so bad input is skipped and counted with the
data tests' reasons, padding, sharding across ranks, exact resume and the DALI backend apply to them too."""

from __future__ import annotations

import io
import json
import logging
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from fastblip.data import DataSection, NLVRFormat, VideoFormat, VQAFormat, open_loader
from fastblip.data.readers import SourceError


def _jpeg(colour, size=24, seed=0, mode="RGB") -> bytes:
    rng = np.random.default_rng(seed)
    a = np.clip(np.array(colour, dtype=np.int16) + rng.integers(-20, 21, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).convert(mode).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


RED, BLUE = (220, 30, 30), (30, 30, 220)
GOOD = _jpeg(RED)
NOISE = io.BytesIO()  # the data tests' truncation case: a noisy 40x30 JPEG cut in half
Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(NOISE, "JPEG", quality=90)
NOISE = NOISE.getvalue()
BAD_IMAGES = {  # file bytes -> the reason the data tests give (test_data_bad_input.py)
    "corrupt": (b"\xff\xd8\xff\xe0" + b"garbage" * 50, "corrupt_image"),
    "truncated": (NOISE[: len(NOISE) // 2], "truncated_image"),
    "empty": (b"", "empty_image"),
    "svg": (b"<svg xmlns='http://www.w3.org/2000/svg'></svg>", "unsupported_format"),
}


def _section(sources, train: bool, **kw) -> DataSection:
    base = dict(image_size=16, batch_size=4, num_workers=0, randaugment=False, min_scale=0.5, padding="longest")
    base.update(kw)
    return DataSection(train=sources if train else [], eval=[] if train else sources, **base)


def _drain(loader) -> list:
    return [b for b in loader]


def _resumed_equals_straight(make, record, stop_after: int = 2) -> int:
    """Batches of a loader stopped after ``stop_after`` and resumed from its state_dict in a new one equal an
    uninterrupted pass (``record(batch)`` compared bit for bit: keys, augmentations...). Returns the count."""

    def run(loader, n=None):
        out = []
        for b in loader:
            out.append(record(b))
            if n is not None and len(out) == n:
                break
        return out

    full = run(make())
    first = make()
    head = run(first, stop_after)
    second = make()
    second.load_state_dict(first.state_dict())
    got = head + run(second)
    assert len(got) == len(full) > stop_after
    for a, b in zip(full, got, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    return len(full)


# -- VQA ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vqa_set(tmp_path_factory):
    d = tmp_path_factory.mktemp("vqa")
    (d / "img").mkdir()
    anns = []
    for i in range(10):  # 10 good questions over 5 images, colours alternate
        (d / "img" / f"g{i}.jpg").write_bytes(_jpeg(RED if i % 2 else BLUE, seed=i))
        anns.append({"question_id": 100 + i, "question": f"What colour is shape {i}?", "image": f"img/g{i}.jpg",
                     "answer": ["red", "red", "blue"] if i % 2 else ["blue"], "dataset": "vqa"})
    for name, (data, _) in BAD_IMAGES.items():
        (d / "img" / f"{name}.jpg").write_bytes(data)
        anns.append({"question_id": name, "question": "what is it?", "image": f"img/{name}.jpg", "answer": ["x"]})
    (d / "img" / "cmyk.jpg").write_bytes(_jpeg(RED, mode="CMYK"))
    nasty = [
        ({"question_id": "missing", "question": "where?", "image": "img/nope.jpg", "answer": ["x"]}, "missing_image"),
        ({"question_id": "devzero", "question": "zero?", "image": "/dev/zero", "answer": ["x"]}, "not_a_file"),
        ({"question_id": "punct", "question": "...!!! ;;", "image": "img/g0.jpg", "answer": ["x"]}, "empty_question"),
        ({"question_id": "noans", "question": "how many?", "image": "img/g0.jpg", "answer": []}, "missing_answer"),
        ({"question_id": "intans", "question": "how many?", "image": "img/g0.jpg", "answer": [3]}, "bad_answer"),
        ({"question_id": "cmyk", "question": "cmyk image?", "image": "img/cmyk.jpg", "answer": ["yes"]}, "ok"),
        ({"question_id": "vg", "question": "visual genome?", "image": "img/g1.jpg", "answer": ["a", "a"],
          "dataset": "vg"}, "ok"),
    ]
    anns += [a for a, _ in nasty]
    (d / "train.json").write_text(json.dumps(anns))
    want = {reason: 1 for _, reason in BAD_IMAGES.values()}
    want.update({r: 1 for _, r in nasty if r != "ok"})
    return {"dir": d, "json": str(d / "train.json"), "n_ok": 12, "skipped": want}


def test_vqa_nasty_input_skipped_and_counted(vqa_set, caplog):
    caplog.set_level(logging.WARNING, logger="fastblip.data")
    loader = open_loader(_section([vqa_set["json"]], True, batch_size=3), train=True, seed=1, fmt=VQAFormat(True))
    batches = _drain(loader)
    s = loader.stats
    assert s["ok"] == vqa_set["n_ok"] and s["skipped"] == vqa_set["skipped"] and s["converted"] == {"CMYK": 1}
    assert sum(len(b) for b in batches) == 12 and all(len(b) == 3 for b in batches)  # drop_last in training
    assert 1 <= len(caplog.records) <= 5  # the first few logged with their file, the rest counted
    seen = {q for b in batches for q in b.question_ids}
    assert seen == {100 + i for i in range(10)} | {"cmyk", "vg"}
    b = next(x for x in batches if "vg" in x.question_ids)
    i = b.question_ids.index("vg")
    # official weights: "vg" entries 0.2 per answer (duplicates kept); "vqa": count / #answers per unique answer
    off = int(b.n[:i].sum())
    assert b.weights[off:off + int(b.n[i])].tolist() == pytest.approx([0.2, 0.2])
    for j, q in enumerate(b.question_ids):
        if isinstance(q, int) and q % 2:
            off = int(b.n[:j].sum())
            assert b.weights[off:off + 2].tolist() == pytest.approx([2 / 3, 1 / 3])
    assert b.answer_ids.shape[0] == int(b.n.sum()) == b.weights.shape[0]


def test_vqa_padding_buckets_and_eval_keeps_answerless(vqa_set):
    loader = open_loader(_section([vqa_set["json"]], False, padding="buckets:8,16", max_length=30), train=False,
                         fmt=VQAFormat(False))
    batches = _drain(loader)
    assert all(b.input_ids.shape[1] in (8, 16) and b.answer_ids.shape[1] in (8, 16) for b in batches)
    # evaluation: an entry without answers is a question to answer (the test server's split), not a skip
    assert "noans" in {q for b in batches for q in b.question_ids}
    assert loader.stats["skipped"].get("missing_answer") is None


def test_vqa_tar_shard_layout(tmp_path):
    path = tmp_path / "vqa-000.tar"
    with tarfile.open(path, "w") as tf:
        for i in range(5):
            members = {"jpg": _jpeg(RED, seed=i),
                       "json": json.dumps({"question": f"q {i}?", "answer": ["red"], "question_id": i}).encode()}
            if i == 3:
                members["jpg"] = b"\xff\xd8\xff\xe0broken"
            if i == 1:  # over the section's image limit: skipped unread as too_large, as in every format
                members["jpg"] = NOISE * 4
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    loader = open_loader(_section([str(path)], False, max_image_bytes=2 * len(NOISE)), train=False,
                         fmt=VQAFormat(False))
    qids = [q for b in loader for q in b.question_ids]
    assert qids == [0, 2, 4] and loader.stats["skipped"] == {"corrupt_image": 1, "too_large": 1}


def test_vqa_sharding_and_exact_resume(vqa_set):
    sec = _section([vqa_set["json"]], False, batch_size=2)
    ranks = [[q for b in open_loader(sec, train=False, rank=r, world_size=2, fmt=VQAFormat(False)) for q in
              b.question_ids] for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1])  # evaluation: disjoint slices, nothing dropped or repeated
    assert len(ranks[0]) + len(ranks[1]) == vqa_set["n_ok"] + 1  # + "noans", a question in evaluation
    tr = _section([vqa_set["json"]], True, batch_size=2, num_workers=2, randaugment=True)
    counts = [len(open_loader(tr, train=True, rank=r, world_size=2, fmt=VQAFormat(True))) for r in range(2)]
    assert counts[0] == counts[1] > 0  # training: equal batch counts per rank keep DDP in step

    n = _resumed_equals_straight(lambda: open_loader(tr, train=True, seed=3, fmt=VQAFormat(True)),
                                 lambda b: (b.question_ids, b.pixel_values.clone(), b.input_ids.clone()))
    assert n >= 4  # augmentations included, bit for bit


def test_vqa_bad_annotation_file_is_one_error(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps([{"question_id": 1, "image": "a.jpg"}]))  # no question
    with pytest.raises(SourceError, match=r"bad.json: item 0: 'question' must be str"):
        open_loader(_section([str(p)], True), train=True, fmt=VQAFormat(True))
    p.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(SourceError, match="expected a JSON list"):
        open_loader(_section([str(p)], True), train=True, fmt=VQAFormat(True))


# -- NLVR2 --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nlvr_set(tmp_path_factory):
    d = tmp_path_factory.mktemp("nlvr")
    (d / "red.jpg").write_bytes(_jpeg(RED))
    (d / "blue.jpg").write_bytes(_jpeg(BLUE))
    (d / "corrupt.jpg").write_bytes(BAD_IMAGES["corrupt"][0])
    anns = [{"images": ["red.jpg", "blue.jpg"], "sentence": f"the left image is red {i}", "label": "True",
             "identifier": f"ok-{i}"} for i in range(16)]
    anns += [
        {"images": ["red.jpg", "corrupt.jpg"], "sentence": "right one broken", "label": "False", "identifier": "c"},
        {"images": ["gone.jpg", "blue.jpg"], "sentence": "left one missing", "label": "True", "identifier": "m"},
        {"images": ["red.jpg", "blue.jpg"], "sentence": "!!!", "label": "True", "identifier": "e"},
        {"images": ["red.jpg", "blue.jpg"], "sentence": "a label", "label": "maybe", "identifier": "l"},
    ]
    (d / "train.json").write_text(json.dumps(anns))
    return {"json": str(d / "train.json"), "dir": d,
            "skipped": {"corrupt_image": 1, "missing_image": 1, "empty_caption": 1, "bad_label": 1}}


def test_nlvr_nasty_input_and_side_swap(nlvr_set):
    loader = open_loader(_section([nlvr_set["json"]], True, hflip=False), train=True, seed=0,
                         fmt=NLVRFormat(True))
    batches = _drain(loader)
    assert loader.stats["skipped"] == nlvr_set["skipped"] and loader.stats["ok"] == 16
    swapped = 0
    for b in batches:
        for i, m in enumerate(b.meta):
            red_left = b.pixel_values[i, 0].mean() > b.pixel_values[i, 2].mean()  # R channel vs B channel
            red_right = b.pixel_values_1[i, 0].mean() > b.pixel_values_1[i, 2].mean()
            assert red_left != red_right
            # a swapped pair has its images and its sides in the sentence exchanged, as the official dataset
            assert red_left == (not m["swapped"]) and ("right image" in b.texts[i]) == m["swapped"]
            swapped += m["swapped"]
    assert 2 <= swapped <= 14  # p = 0.5 over 16 pairs: outside [2, 14] has probability 0.0005
    ev = _drain(open_loader(_section([nlvr_set["json"]], False), train=False, fmt=NLVRFormat(False)))
    assert all(not m["swapped"] for b in ev for m in b.meta)  # evaluation keeps the order
    assert all(b.labels.tolist() == [1] * len(b) for b in ev)


def test_nlvr_exact_resume_includes_the_swaps(nlvr_set):
    sec = _section([nlvr_set["json"]], True, batch_size=3, num_workers=1, randaugment=True)

    n = _resumed_equals_straight(lambda: open_loader(sec, train=True, seed=5, fmt=NLVRFormat(True)),
                                 lambda b: (b.keys, [m["swapped"] for m in b.meta], b.pixel_values_1.clone()))
    assert n == 16 // 3


def test_nlvr_and_vqa_through_dali_match_pil(nlvr_set, vqa_set):
    pytest.importorskip("nvidia.dali")
    for src, fmt in ((nlvr_set["json"], NLVRFormat(False)), (vqa_set["json"], VQAFormat(False))):
        pil = _drain(open_loader(_section([src], False), train=False, fmt=fmt))
        dali = _drain(open_loader(_section([src], False, backend="dali"), train=False, fmt=fmt))
        assert [b.keys for b in pil] == [b.keys for b in dali] and len(pil) > 1
        for a, b in zip(pil, dali, strict=True):
            assert torch.equal(a.input_ids, b.input_ids)
            pix = [(a.pixel_values, b.pixel_values)] + ([(a.pixel_values_1, b.pixel_values_1)]
                                                        if fmt.name == "nlvr" else [])
            for x, y in pix:
                # DALI's antialiased cubic resize vs PIL's bicubic: 1-2 levels of 255 (test_data_dali.py),
                # 0.1 in normalised units ~ 6 levels
                assert (x - y).abs().max() < 0.1
    # training through DALI: the same samples, sentences and swaps as PIL (the RNG draws are shared)
    kw = dict(hflip=False, batch_size=4)
    pil = _drain(open_loader(_section([nlvr_set["json"]], True, **kw), train=True, seed=2, fmt=NLVRFormat(True)))
    dali = _drain(open_loader(_section([nlvr_set["json"]], True, backend="dali", **kw), train=True, seed=2,
                              fmt=NLVRFormat(True)))
    assert [(b.keys, b.texts, [m["swapped"] for m in b.meta]) for b in pil] == \
        [(b.keys, b.texts, [m["swapped"] for m in b.meta]) for b in dali]
    for a, b in zip(pil, dali, strict=True):
        assert torch.equal(a.pixel_values[:, 0] > a.pixel_values[:, 2], b.pixel_values[:, 0] > b.pixel_values[:, 2])


def test_nlvr_bad_annotation_file_is_one_error(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps([{"images": ["a.jpg", "b.jpg", "c.jpg"], "sentence": "three", "label": "True"}]))
    with pytest.raises(SourceError, match="'images' must be two image paths"):
        open_loader(_section([str(p)], True), train=True, fmt=NLVRFormat(True))


# -- video --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def video_set(tmp_path_factory):
    pytest.importorskip("av")
    from fastblip.downstream_synth import make_video

    d = tmp_path_factory.mktemp("video")
    clips = make_video(d, num=5, frames=10, image_size=32, seed=0)
    ann = json.loads(open(clips["test_json"]).read())
    (d / "videos" / "garbage.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"junk" * 100)
    (d / "videos" / "empty.mp4").write_bytes(b"")
    ann += [{"clip_name": "garbage", "caption": "a broken clip", "question": "q?", "answer": "red"},
            {"clip_name": "empty", "caption": "an empty clip", "question": "q?", "answer": "red"},
            {"clip_name": "absent", "caption": "no such clip", "question": "q?", "answer": "red"}]
    (d / "with_bad.json").write_text(json.dumps(ann))
    return {"json": str(d / "with_bad.json"), "root": clips["video_root"], "n_ok": 5}


def test_video_nasty_input_skipped_with_its_caption(video_set):
    fmt = VideoFormat(num_frames=4, video_root=video_set["root"])
    loader = open_loader(_section([video_set["json"]], False, batch_size=3), train=False, fmt=fmt)
    batches = _drain(loader)
    assert loader.stats["skipped"] == {"corrupt_video": 2, "missing_image": 1} and loader.stats["ok"] == 5
    assert [tuple(b.pixel_values.shape) for b in batches] == [(3, 4, 3, 16, 16), (2, 4, 3, 16, 16)]
    assert all(len(b.texts) == len(b) for b in batches) and not {"garbage", "empty", "absent"} & \
        {k for b in batches for k in b.keys}


def test_video_refuses_dali_in_one_line(video_set):
    pytest.importorskip("nvidia.dali")
    fmt = VideoFormat(num_frames=4, video_root=video_set["root"])
    with pytest.raises(ValueError, match="data.backend=dali does not decode videos"):
        open_loader(_section([video_set["json"]], False, backend="dali"), train=False, fmt=fmt)


def test_every_task_reads_through_open_loader():
    """No task keeps a loader of its own: each task module's build_loader calls fastblip.data.open_loader."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "fastblip" / "tasks"
    for name in ("pretrain", "retrieval", "vqa", "nlvr", "video"):
        tree = ast.parse((root / f"{name}.py").read_text())
        fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "build_loader")
        calls = {c.func.id for c in ast.walk(fn) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
        assert "open_loader" in calls, name
        assert not any(isinstance(n, ast.ClassDef) and "Loader" in n.name for n in tree.body), name


def test_vqa_answer_list_errors_are_one_line(tmp_path):
    from fastblip.errors import FastblipError
    from fastblip.tasks.vqa import load_answer_list

    p = tmp_path / "answers.json"
    for text, msg in (("[\"red\", 2]", None), ("[]", "list of answers is empty"), ("{\"a\": 1}", "expected a JSON list"),
                      ("[\"red\"", "not valid JSON")):
        p.write_text(text)
        if msg is None:
            assert load_answer_list(str(p)) == ["red", "2"]
            continue
        with pytest.raises(FastblipError, match=msg):
            load_answer_list(str(p))
    with pytest.raises(FileNotFoundError, match="answer_list not found"):
        load_answer_list(str(tmp_path / "absent.json"))


@pytest.mark.parametrize("task", ["vqa", "nlvr"])
def test_trainer_runs_vqa_and_nlvr_on_dali(task, tmp_path):
    """The shipped tiny recipes with data.backend=dali: two training steps and the end-of-run evaluation go
    through the DALI backend (CPU pipeline here, nvJPEG on a GPU) and report the loader's counts."""
    pytest.importorskip("nvidia.dali")
    from fastblip.train.loop import Trainer
    from fastblip.train.recipe import read_recipe

    syn = tmp_path / "synth"
    spec = {"vqa": ("num_val", [f"data.train=[{syn}/vqa_train.json]", f"data.eval=[{syn}/vqa_val.json]",
                                f"task_options.answer_list={syn}/answer_list.json"]),
            "nlvr": ("num_dev", [f"data.train=[{syn}/nlvr_train.json]", f"data.eval=[{syn}/nlvr_dev.json]"])}[task]
    r = read_recipe(f"recipes/finetune_{task}_tiny_cpu.yaml", [
        f"task_options.synthetic={{out_dir: {syn}, num_train: 8, {spec[0]}: 4, image_size: 32, seed: 0}}", *spec[1],
        "data.backend=dali", "data.batch_size=4", "data.image_size=32", "train.max_steps=2", "train.log_every=1",
        "train.eval_every_epoch=false", f"train.out_dir={tmp_path / 'run'}"])
    tr = Trainer(r, progress=False)
    assert tr.backends.data == "dali"
    out = tr.fit()
    assert out["step"] == 2 and out["data"]["ok"] >= 8 and out["data"]["skipped"] == {}
    assert np.isfinite(out["loss"]) and (out.get("eval_vqa_acc") is not None or out.get("eval_num") == 4)

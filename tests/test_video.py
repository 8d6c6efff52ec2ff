"""Zero-shot video: PyAV decode + uniform sampling, the video ITC feature (mean of projected frame [CLS], then
normalised, as the official eval), and the retrieval / QA evaluation paths on synthetic clips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("av")

from fastblip.config import tiny_config  # noqa: E402
from fastblip.downstream_synth import make_video  # noqa: E402
from fastblip.eval.video import (  # noqa: E402
    encode_videos,
    evaluate_video_retrieval,
    load_video_frames,
    sample_indices,
    video_loader,
    video_qa,
)
from fastblip.models import build_model  # noqa: E402


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return make_video(tmp_path_factory.mktemp("clips"), num=6, frames=12, image_size=32, seed=0)


def test_sampling_and_decode(clips):
    assert sample_indices(12, 8).tolist() == [0, 1, 3, 4, 6, 7, 9, 10]  # arange(0, 12, 1.5).astype(int)
    assert sample_indices(3, 8).tolist()[0] == 0 and len(sample_indices(3, 8)) == 8
    fr = load_video_frames(f"{clips['video_root']}/video00000.mp4", 8, 32)
    assert fr.shape == (8, 3, 32, 32)
    assert not torch.allclose(fr[0], fr[-1])  # the shapes move
    with pytest.raises(FileNotFoundError):
        load_video_frames(f"{clips['video_root']}/missing.mp4")
    # the loader's video format yields the same frames as the path function
    b = next(iter(video_loader([clips["test_json"]], image_size=32, num_frames=8, batch_size=1,
                               video_root=clips["video_root"])))
    assert b.pixel_values.shape == (1, 8, 3, 32, 32)
    torch.testing.assert_close(b.pixel_values[0], fr, rtol=0, atol=0)


def test_video_retrieval_and_qa_paths(clips):
    import json

    torch.manual_seed(0)
    m = build_model(tiny_config("itm", ops_backend="reference")).eval()
    ann = json.loads(open(clips["test_json"]).read())
    paths = [f"{clips['video_root']}/{a['clip_name']}.mp4" for a in ann]
    fr = torch.stack([load_video_frames(p, 8, 32) for p in paths[:2]])
    tokens, feat = encode_videos(m, fr)
    emb = m.visual_encoder(fr.flatten(0, 1))
    want = F.normalize(m.vision_proj(emb[:, 0]).view(2, 8, -1).mean(1), dim=-1)
    torch.testing.assert_close(feat, want, rtol=1e-5, atol=1e-6)
    assert tokens.shape == (2, 8 * emb.shape[1], emb.shape[2])
    loader = video_loader([clips["test_json"]], image_size=32, batch_size=4, video_root=clips["video_root"])
    r = evaluate_video_retrieval(m, loader, k_test=4)
    assert set(r) >= {"txt_r1", "img_r1", "img_r10", "r_mean"} and r["img_r10"] == 100.0
    vqa = build_model(tiny_config("vqa", ops_backend="reference")).eval()
    qa = video_loader([clips["test_json"]], image_size=32, batch_size=4, video_root=clips["video_root"], mode="qa")
    answers, gold = video_qa(vqa, qa, answer_list=["red", "blue", "green"], k_test=2)
    assert len(answers) == len(gold) == len(ann) and set(answers) <= {"red", "blue", "green"}
    assert gold == [a["answer"] if isinstance(a["answer"], str) else a["answer"][0] for a in ann]
    assert np.isfinite(r["r_mean"])


def test_fastblip_eval_video_recipe_end_to_end(tmp_path, capsys):
    """`fastblip eval --recipe recipes/eval_video_retrieval_tiny_cpu.yaml`: the recipe generates its clips
    (task_options.synthetic), the CLI loads model.init_from, dispatches to tasks/video.evaluate, and prints the
    same recalls as evaluate_video_retrieval on the same weights."""
    import json

    import fastblip
    from fastblip.cli import main

    torch.manual_seed(0)
    m = build_model(tiny_config("retrieval", ops_backend="reference",
                                vision={"image_size": 64, "patch_size": 16})).eval()  # the recipe's geometry
    fastblip.save(m, tmp_path / "model")
    synth = tmp_path / "synth"
    rc = main(["eval", "--recipe", "recipes/eval_video_retrieval_tiny_cpu.yaml", f"model.init_from={tmp_path / 'model'}",
               f"data.eval=[{synth}/video_test.json]", "task_options.k_test=4", f"task_options.video_root={synth}/videos",
               f"task_options.synthetic={{out_dir: {synth}, num: 6, frames: 12, image_size: 64, seed: 1}}",
               f"train.out_dir={tmp_path / 'run'}", "--json"])
    assert rc == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(got) >= {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"}
    ann = json.loads((synth / "video_test.json").read_text())
    assert len(ann) == 6
    want = evaluate_video_retrieval(fastblip.load(tmp_path / "model", image_size=64),
                                    video_loader([synth / "video_test.json"], image_size=64, batch_size=4,
                                                 video_root=str(synth / "videos")), k_test=4)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-9), k
    assert got["img_r10"] == 100.0  # 6 videos: every text's video is in its top 10

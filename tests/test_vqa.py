"""VQA: ranking parity with a transcription of the official rank_answer, HF generate parity, the VQA accuracy
metric on a hand-computed fixture, and a tiny synthetic finetune whose accuracy beats the answer-type prior."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from fastblip.config import tiny_config
from fastblip.eval.vqa import normalize_answer, question_accuracy, vqa_accuracy, write_results
from fastblip.models import build_model


@pytest.fixture(scope="module")
def vqa_model():
    torch.manual_seed(0)
    m = build_model(tiny_config("vqa", attention_backend="reference", ops_backend="reference")).eval()
    with torch.no_grad():  # a sharper decoder than the 0.02 init makes the ranking non-trivial
        for p in m.text_decoder.parameters():
            p.mul_(3.0)
    return m


def _official_rank(m, pv, questions, answer_list, k):
    """Transcription of BLIP_VQA.forward(train=False, inference='rank') + rank_answer: states tiled k times,
    full-vocabulary logits, label-smoothed (0.1) CE summed per answer."""
    tok = m.tokenizer
    q = tok(questions, max_length=35, padding="longest")
    qid, qatt = q["input_ids"].clone(), q["attention_mask"]
    qid[:, 0] = 30523  # [ENC]
    img = m.visual_encoder(pv)
    states = m.text_encoder(qid, qatt, image=img)
    a = tok(answer_list, padding="longest", max_length=512)
    aid, aatt = a["input_ids"].clone(), a["attention_mask"]
    aid[:, 0] = 30522  # [DEC]
    B = states.shape[0]
    dec = m.text_decoder
    start = aid[0, 0].repeat(B, 1)
    logits = dec(start, None, dec.bert.image_kv(states, qatt.bool()))[:, 0, :]
    prob_first = F.softmax(logits, dim=1).index_select(1, aid[:, 1])
    _, topk_ids = prob_first.topk(k, dim=1)
    ids = torch.cat([aid.index_select(0, t) for t in topk_ids])
    att = torch.cat([aatt.index_select(0, t) for t in topk_ids])
    targets = ids.masked_fill(ids == 0, -100)
    st = states.repeat_interleave(k, dim=0)
    sa = qatt.repeat_interleave(k, dim=0)
    out = dec(ids, att, dec.bert.image_kv(st, sa.bool()))
    loss = F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), targets[:, 1:].reshape(-1),
                           label_smoothing=0.1, reduction="none").view(ids.shape[0], -1).sum(1)
    best = (-loss).view(B, k).argmax(dim=1)
    return [answer_list[int(topk_ids[b, best[b]])] for b in range(B)], (-loss).view(B, k)


ANSWERS = ["red", "blue", "two", "green circle", "yes", "no", "on the left side", "3", "purple", "a big star"]


def test_rank_matches_official_transcription(vqa_model):
    m = vqa_model
    torch.manual_seed(1)
    pv = torch.randn(3, 3, 32, 32)
    qs = ["what colour is the circle?", "how many?", "is there a big star on the left side of it?"]
    for k in (4, 10):
        want, scores = _official_rank(m, pv, qs, ANSWERS, k)
        assert m.answer(pv, qs, answer_list=ANSWERS, k_test=k) == want
    # the transcription's scores are not all tied (the comparison is meaningful)
    assert float(scores.detach().std()) > 1e-3
    # per-sequence losses equal too (our kv_index sharing vs the official tiling)
    q = m.tokenizer(qs, max_length=35, padding="longest")
    states = m.encode_question(m.encode_image(pv), q["input_ids"], q["attention_mask"])
    a = m.tokenizer(ANSWERS, padding="longest")
    kv = m._question_kv(states, q["attention_mask"])
    kv.kv_index = torch.arange(3).repeat_interleave(10)
    ours = -m.answer_losses(kv, a["input_ids"].repeat(3, 1), a["attention_mask"].repeat(3, 1)).view(3, 10)
    _, ref = _official_rank(m, pv, qs, ANSWERS, 10)
    # ref rows are in top-k order: compare as sorted sets of scores
    torch.testing.assert_close(ours.sort(dim=1).values, ref.sort(dim=1).values, rtol=1e-5, atol=1e-5)


def test_hf_generate_parity(tmp_path):
    pytest.importorskip("transformers")
    from transformers import BlipConfig, BlipForQuestionAnswering

    import fastblip

    torch.manual_seed(0)
    cfg = BlipConfig(
        text_config=dict(vocab_size=30524, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, encoder_hidden_size=64, label_smoothing=0.1),
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8))
    hf = BlipForQuestionAnswering(cfg).eval()
    with torch.no_grad():
        for p in hf.text_decoder.parameters():
            p.mul_(4.0)  # peaked distributions: distinct answers, no near-ties between beams
    hf.save_pretrained(tmp_path / "hf")
    ours = fastblip.load(tmp_path / "hf")  # fastblip.load's HF path (fastblip/checkpoints/hf.py)
    assert ours.kind == "vqa"
    pv = torch.randn(2, 3, 32, 32)
    enc = ours.tokenizer(["what is on the left?", "how many shapes"], max_length=35, padding="longest")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    hf_ids = ids.clone()
    hf_ids[:, 0] = 30523  # HF feeds ids as given: [ENC] first reproduces the official model
    with torch.no_grad():
        out = hf.generate(input_ids=hf_ids, pixel_values=pv, attention_mask=mask, num_beams=3, max_length=10,
                          min_length=1)
    want = ours.tokenizer.batch_decode(out.tolist(), skip_special_tokens=True)
    got = ours.answer(pv, ids, attention_mask=mask, method="generate")
    assert got == want
    assert any(w.strip() for w in want)


def test_vqa_accuracy_fixture(tmp_path):
    # normalisation (only applied when the humans disagree, as the standard evaluator)
    assert normalize_answer("The two dogs.") == "2 dogs"
    assert normalize_answer("dont, know!") == "don't know"
    assert normalize_answer("an apple") == "apple"
    gts = {
        1: ["2"] * 10,  # unanimous: no normalisation, "two" does not match
        2: ["two"] * 4 + ["2"] * 2 + ["3"] * 4,  # disagree: "two" -> "2", 6 humans say 2
        3: ["red"] * 2 + ["blue"] * 8,  # 2 humans agree with "red": each subset 1/3 or 2/3... see below
        4: ["yes"] * 3 + ["no"] * 7,
        5: ["a dog"] * 10,
    }
    results = [{"question_id": 1, "answer": "two"}, {"question_id": 2, "answer": "Two!"},
               {"question_id": 3, "answer": "red"}, {"question_id": 4, "answer": "yes"},
               {"question_id": 5, "answer": "a dog"}]
    # q3: leaving out one of the 2 "red" humans -> 1 match (1/3), leaving out a "blue" -> 2 matches (2/3)
    q3 = (2 * (1 / 3) + 8 * (2 / 3)) / 10
    # q4: 3 "yes": leave out a yes -> 2/3, leave out a no -> 3/3 = 1
    q4 = (3 * (2 / 3) + 7 * 1.0) / 10
    assert question_accuracy("two", gts[1]) == 0.0
    assert question_accuracy("Two!", gts[2]) == pytest.approx(1.0)
    assert question_accuracy("red", gts[3]) == pytest.approx(q3)
    assert question_accuracy("yes", gts[4]) == pytest.approx(q4)
    acc = vqa_accuracy(results, gts)
    assert acc["vqa_acc"] == pytest.approx(100 * (0 + 1 + q3 + q4 + 1) / 5)
    p = write_results(results, tmp_path / "res.json")
    assert json.loads(p.read_text()) == [{"question_id": r["question_id"], "answer": r["answer"]} for r in results]


def test_training_loss_is_weighted_official(vqa_model):
    m = vqa_model
    torch.manual_seed(2)
    pv = torch.randn(2, 3, 32, 32)
    q = m.tokenizer(["what colour?", "how many?"], max_length=35, padding="longest")
    a = m.tokenizer(["red", "blue", "two"], padding="longest")
    n, w = torch.tensor([2, 1]), torch.tensor([0.7, 0.3, 1.0])
    with torch.no_grad():
        loss = m(pv, q["input_ids"], q["attention_mask"], a["input_ids"], a["attention_mask"], n, w)
        qid = q["input_ids"].clone()
        qid[:, 0] = 30523
        states = m.text_encoder(qid, q["attention_mask"], image=m.visual_encoder(pv))
        st = torch.stack([states[0], states[0], states[1]])
        sa = torch.stack([q["attention_mask"][0], q["attention_mask"][0], q["attention_mask"][1]])
        aid = a["input_ids"].clone()
        aid[:, 0] = 30522
        out = m.text_decoder(aid, a["attention_mask"], m.text_decoder.bert.image_kv(st, sa.bool()))
        tgt = a["input_ids"].masked_fill(a["attention_mask"] == 0, -100)
        per = F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), tgt[:, 1:].reshape(-1), label_smoothing=0.1,
                              reduction="none").view(3, -1).sum(1)
    torch.testing.assert_close(loss, (w * per).sum() / 2, rtol=1e-5, atol=1e-6)


def _tiny_recipe(synth_dir, out_dir, *extra):
    from fastblip.train.recipe import read_recipe

    return read_recipe("recipes/finetune_vqa_tiny_cpu.yaml", [
        f"task_options.synthetic={{out_dir: {synth_dir}, num_train: 8, num_val: 4, image_size: 32, seed: 0}}",
        f"data.train=[{synth_dir}/vqa_train.json]", "data.eval=[]", f"task_options.answer_list={synth_dir}/answer_list.json",
        "data.batch_size=8", "train.log_every=1", f"train.out_dir={out_dir}", *extra])


def test_resume_is_bit_exact(tmp_path):
    """N + resume + N == 2N through the shared Trainer and the one data pipeline (state_dict / load_state_dict): 8 images x 3
    questions / batch 8 = 3 steps per epoch, so the 2 + 2 split resumes mid-epoch and crosses an epoch end."""
    from fastblip.train import checkpoint as ck
    from fastblip.train.loop import Trainer

    synth = tmp_path / "synth"  # generated by the recipe's task_options.synthetic on first use
    common = ("train.epochs=2", "train.seed=7")
    Trainer(_tiny_recipe(synth, tmp_path / "straight", "train.max_steps=4", *common), progress=False).fit()
    assert (synth / "vqa_train.json").is_file()
    split = tmp_path / "split"
    Trainer(_tiny_recipe(synth, split, "train.max_steps=2", *common), progress=False).fit()
    Trainer(_tiny_recipe(synth, split, "train.max_steps=4", *common), resume=True, progress=False).fit()
    a, b = (ck.load_checkpoint(ck.latest_checkpoint(d)) for d in (tmp_path / "straight", split))
    assert a["step"] == b["step"] == 4 and a["epoch"] == b["epoch"] == 1
    assert a["per_rank"][0]["data"] == b["per_rank"][0]["data"]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    logs = [[json.loads(x) for x in (d / "log.jsonl").read_text().splitlines()] for d in (tmp_path / "straight", split)]
    assert [x["loss"] for x in logs[0]] == [x["loss"] for x in logs[1]]  # the same 4 losses, bit for bit
    # a model that trained moved: the straight run's weights differ from the initial ones
    init = Trainer(_tiny_recipe(synth, tmp_path / "fresh", "train.max_steps=1", *common), progress=False).model
    assert not torch.equal(init.state_dict()["text_decoder.cls.predictions.bias"],
                           a["model"]["text_decoder.cls.predictions.bias"])

"""VQA: ranking parity with a transcription of the official rank_answer, HF generate parity, the VQA accuracy
metric on a hand-computed fixture, and a tiny synthetic finetune whose accuracy beats the answer-type prior."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from fastblip.config import tiny_config
from fastblip.eval.vqa import normalize_answer, question_accuracy, vqa_accuracy, write_results
from fastblip.models.blip import build_model


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


@pytest.mark.slow  # ~1.5 s/step on the 2-core CI CPU (AdamW over 2 x 30,524-token embeddings): over budget
def test_tiny_finetune_beats_prior(trained_vqa):
    model, recipe, metrics = trained_vqa
    from fastblip.downstream_synth import VQA_CHANCE

    assert metrics["vqa_acc"] > 100 * VQA_CHANCE + 15, metrics
    res = json.loads(open(metrics["results_file"]).read())
    assert len(res) == metrics["num_questions"] and set(res[0]) == {"question_id", "answer"}


@pytest.fixture(scope="session")
def trained_vqa(tmp_path_factory):
    from fastblip.downstream_synth import make_vqa
    from fastblip.tasks import get_task
    from fastblip.train.recipe import read_recipe

    d = tmp_path_factory.mktemp("synth_vqa")
    paths = make_vqa(d, num_train=256, num_val=48, image_size=32, seed=0)
    recipe = read_recipe("recipes/finetune_vqa_tiny_cpu.yaml", [
        f"data.train=[{paths['train_json']}]", f"data.eval=[{paths['val_json']}]",
        f"task_options.answer_list={paths['answer_list']}", f"train.out_dir={d / 'run'}"])
    model = _minimal_train(recipe, steps=240)
    metrics = get_task("vqa").evaluate(model, recipe)
    return model, recipe, metrics


def _minimal_train(recipe, steps: int):
    """A minimal loop (AdamW, constant lr) over the task's loader and the model's training_forward; the shared
    Trainer is exercised by its own tests."""
    from fastblip.tasks import get_task

    torch.manual_seed(0)
    model = build_model(recipe.model_config())
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.train.lr, weight_decay=recipe.train.weight_decay,
                            foreach=True)
    loader = get_task(recipe.task).build_loader(recipe, train=True)
    done = 0
    while done < steps:
        for batch in loader:
            loss = model.training_forward(batch)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if done >= steps:
                break
    return model.eval()

"""NLVR2: logits equal a transcription of the official two-image encoder; pretrained -> NLVR key mapping."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastblip.config import tiny_config
from fastblip.models import build_model
from fastblip.models.blip_nlvr import merge_from, nlvr_init_from_pretrained


def _official_logits(m, pv0, pv1, ids, mask):
    """Transcription of BLIP_NLVR.forward + nlvr_encoder: explicit softmax attention per image, outputs averaged
    (first half of the layers) or merged by merge_layer(cat) (second half), residual + LayerNorm."""
    img = m.visual_encoder(torch.cat([pv0, pv1]))
    B = pv0.shape[0]
    e0, e1 = img[:B], img[B:]
    ids = ids.clone()
    ids[:, 0] = 30523
    enc = m.text_encoder
    x = enc.embeddings(ids)
    H = m.cfg.text.num_heads

    def att(mod, q_in, kv_in, kmask):
        q, k, v = mod.query(q_in), mod.key(kv_in), mod.value(kv_in)
        sp = lambda t: t.view(t.shape[0], t.shape[1], H, -1).transpose(1, 2)  # noqa: E731
        q, k, v = sp(q), sp(k), sp(v)
        s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        if kmask is not None:
            s = s + (1.0 - kmask[:, None, None, :].float()) * -10000.0
        return (s.softmax(-1) @ v).transpose(1, 2).reshape(q_in.shape)

    for layer in enc.encoder.layer:
        a = layer.attention
        x = a.output.LayerNorm(a.output.dense(att(a.self, x, x, mask)) + x)
        c = layer.crossattention
        h0, h1 = c.output.dense0(att(c.self0, x, e0, None)), c.output.dense1(att(c.self1, x, e1, None))
        h = c.output.merge_layer(torch.cat([h0, h1], -1)) if hasattr(c.output, "merge_layer") else (h0 + h1) / 2
        x = c.output.LayerNorm(h + x)
        x = layer.output.LayerNorm(layer.output.dense(F.gelu(layer.intermediate.dense(x))) + x)
    return m.cls_head(x[:, 0])


def test_nlvr_logits_match_official_transcription():
    torch.manual_seed(0)
    cfg = tiny_config("nlvr", ops_backend="reference")
    cfg.text.num_layers = 4
    cfg.text.num_cross_images = 2
    m = build_model(cfg).eval()
    assert [merge_from(i, 4) for i in range(4)] == [False, False, True, True]
    assert [merge_from(i, 12) for i in range(12)] == [False] * 6 + [True] * 6  # official layers 6..11
    keys = m.state_dict().keys()
    assert "text_encoder.encoder.layer.3.crossattention.output.merge_layer.weight" in keys
    assert "text_encoder.encoder.layer.1.crossattention.output.merge_layer.weight" not in keys
    assert {"cls_head.0.weight", "cls_head.2.weight"} <= set(keys)
    pv0, pv1 = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)
    enc = m.tokenizer(["there is a red shape in the left image", "two", "the right image has stars"])
    with torch.no_grad():
        got = m.nlvr_logits(pv0, pv1, enc["input_ids"], enc["attention_mask"])
        want = _official_logits(m, pv0, pv1, enc["input_ids"], enc["attention_mask"])
        swapped = m.nlvr_logits(pv1, pv0, enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, swapped, atol=1e-4)  # the two images are routed differently


def test_init_from_pretrained_copies_cross_attention():
    torch.manual_seed(0)
    pre = build_model(tiny_config("retrieval")).state_dict()
    sd = {k: v for k, v in pre.items() if k.startswith(("visual_encoder.", "text_encoder."))}
    mapped = nlvr_init_from_pretrained(sd)
    m = build_model(tiny_config("nlvr", text={"num_cross_images": 2}))
    res = m.load_state_dict(mapped, strict=False)
    assert not res.unexpected_keys
    assert sorted(set(k.split(".")[-2] for k in res.missing_keys) - {"0", "2"}) == ["merge_layer"]
    w = sd["text_encoder.encoder.layer.0.crossattention.self.query.weight"]
    for i in (0, 1):
        torch.testing.assert_close(m.text_encoder.encoder.layer[0].crossattention.__getattr__(f"self{i}").query.weight, w)
    d = sd["text_encoder.encoder.layer.1.crossattention.output.dense.weight"]
    torch.testing.assert_close(m.text_encoder.encoder.layer[1].crossattention.output.dense1.weight, d)


def test_recipe_init_from_retrieval_checkpoint_maps_cross_attention(tmp_path):
    """model.init_from = a single-cross-attention checkpoint: build_and_init maps it (self -> self0/self1,
    dense -> dense0/dense1) before load_matching, so every cross-attention weight is loaded, not dropped."""
    from fastblip.train.init import build_and_init
    from fastblip.train.recipe import read_recipe

    torch.manual_seed(3)
    # the recipe's geometry (64 px / patch 16), so every tensor fits and none is dropped
    src = build_model(tiny_config("retrieval", ops_backend="reference",
                                  vision={"image_size": 64, "patch_size": 16})).state_dict()
    torch.save({"model": src}, tmp_path / "retrieval.pth")
    recipe = read_recipe("recipes/finetune_nlvr_tiny_cpu.yaml", [f"model.init_from={tmp_path / 'retrieval.pth'}"])
    m = build_and_init(recipe)
    own = m.state_dict()
    for i in range(len(m.text_encoder.encoder.layer)):
        pre = f"text_encoder.encoder.layer.{i}.crossattention."
        for name in ("query.weight", "key.weight", "value.bias"):
            for j in (0, 1):
                torch.testing.assert_close(own[f"{pre}self{j}.{name}"], src[f"{pre}self.{name}"], rtol=0, atol=0)
        for j in (0, 1):
            torch.testing.assert_close(own[f"{pre}output.dense{j}.weight"], src[f"{pre}output.dense.weight"],
                                       rtol=0, atol=0)
    torch.testing.assert_close(own["visual_encoder.pos_embed"], src["visual_encoder.pos_embed"], rtol=0, atol=0)
    # a native NLVR checkpoint (self0/self1 keys) goes through unchanged
    torch.save({"model": own}, tmp_path / "nlvr.pth")
    again = build_and_init(read_recipe("recipes/finetune_nlvr_tiny_cpu.yaml",
                                       [f"model.init_from={tmp_path / 'nlvr.pth'}"])).state_dict()
    assert all(torch.equal(again[k], v) for k, v in own.items())

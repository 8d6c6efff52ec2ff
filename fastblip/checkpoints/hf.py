"""HF transformers BLIP ``save_pretrained`` directories, both ways.

Only the vision tower is renamed (HF's converter renames nothing else; BLIP_SPEC §6). HF configs differ from
the official model in values that change numbers (vision LayerNorm eps 1e-5 vs 1e-6, text heads default 8,
text dropout 0.0, label smoothing 0.0), so every such value is read from the source ``config.json`` (with
HF's own defaults for absent keys) and written out explicitly on export. The loaded model keeps
``first_token="official"``: the released weights were trained with ``[ENC]``/``[DEC]`` first.
HF's CLIP-style ``BlipModel`` matches no released BLIP weights and is refused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from fastblip.checkpoints.io import CheckpointError, read_tensor_file
from fastblip.config import ModelConfig, TextConfig, VisionConfig

log = logging.getLogger("fastblip")

ARCH_KIND = {
    "BlipForConditionalGeneration": "caption",
    "BlipForImageTextRetrieval": "itm",
    "BlipForQuestionAnswering": "vqa",
}
KIND_ARCH = {"caption": "BlipForConditionalGeneration", "itm": "BlipForImageTextRetrieval",
             "retrieval": "BlipForImageTextRetrieval", "vqa": "BlipForQuestionAnswering"}

# (HF, ours) substrings, applied in order; only vision keys differ.
_RENAMES = (
    ("vision_model.embeddings.class_embedding", "visual_encoder.cls_token"),
    ("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed"),
    ("vision_model.embeddings.patch_embedding", "visual_encoder.patch_embed.proj"),
    ("vision_model.encoder.layers.", "visual_encoder.blocks."),
    ("vision_model.post_layernorm", "visual_encoder.norm"),
    (".self_attn.projection.", ".attn.proj."),
    (".self_attn.qkv.", ".attn.qkv."),
    (".layer_norm1.", ".norm1."),
    (".layer_norm2.", ".norm2."),
)
# HF's config defaults (transformers' BlipTextConfig / BlipVisionConfig) for keys a config.json may omit
_HF_TEXT = dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=8, max_position_embeddings=512, hidden_act="gelu", layer_norm_eps=1e-12,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, bos_token_id=30522, pad_token_id=0,
                sep_token_id=102, label_smoothing=0.0)
_HF_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  image_size=384, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-5, attention_dropout=0.0)


def _read_config_json(path: Path) -> dict:
    p = path / "config.json"
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p}: unreadable ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{p}: expected a JSON object (an HF model config), got a {type(d).__name__}")
    return d


def is_hf_dir(path: Path) -> bool:
    if not (path.is_dir() and (path / "config.json").is_file()):
        return False
    try:
        return _read_config_json(path).get("model_type") == "blip"
    except CheckpointError:
        return False


def hf_to_ours(key: str) -> str:
    for a, b in _RENAMES:
        key = key.replace(a, b)
    return key


def ours_to_hf(key: str) -> str:
    for a, b in reversed(_RENAMES):
        if key.startswith("visual_encoder."):
            key = key.replace(b, a)
    return key


def read_hf_config(path: Path) -> tuple[ModelConfig, dict]:
    d = _read_config_json(path)
    archs = d.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    if arch == "BlipModel" or arch not in ARCH_KIND:
        raise CheckpointError(
            f"{path}: HF architecture {arch!r} is not supported; fastblip loads BlipForConditionalGeneration, "
            "BlipForImageTextRetrieval and BlipForQuestionAnswering (HF's CLIP-style BlipModel matches no "
            "released BLIP weights)")
    for sec in ("text_config", "vision_config"):
        if not isinstance(d.get(sec) or {}, dict):
            raise CheckpointError(f"{path / 'config.json'}: '{sec}' is not a JSON object")
    t = {**_HF_TEXT, **(d.get("text_config") or {})}
    v = {**_HF_VISION, **(d.get("vision_config") or {})}
    if v["hidden_act"] != "gelu":
        raise CheckpointError(f"{path}: vision hidden_act {v['hidden_act']!r} unsupported (BLIP's ViT uses gelu)")
    if v["attention_dropout"]:
        log.warning("%s: vision attention_dropout %s ignored (BLIP's ViT has none)", path, v["attention_dropout"])
    try:
        return _hf_model_config(d, t, v, arch)
    except (TypeError, ValueError, IndexError, KeyError, ZeroDivisionError) as e:  # a value of the wrong type
        raise CheckpointError(f"{path / 'config.json'}: unusable value ({type(e).__name__}: {e})") from None


def _hf_model_config(d: dict, t: dict, v: dict, arch: str) -> tuple[ModelConfig, dict]:
    img = v["image_size"] if isinstance(v["image_size"], int) else v["image_size"][0]
    patch = v["patch_size"] if isinstance(v["patch_size"], int) else v["patch_size"][0]
    vision = VisionConfig(image_size=img, patch_size=patch, width=v["hidden_size"], depth=v["num_hidden_layers"],
                          heads=v["num_attention_heads"], mlp_ratio=v["intermediate_size"] / v["hidden_size"],
                          layer_norm_eps=v["layer_norm_eps"])
    text = TextConfig(vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], num_layers=t["num_hidden_layers"],
                      num_heads=t["num_attention_heads"], intermediate_size=t["intermediate_size"],
                      max_position_embeddings=t["max_position_embeddings"], layer_norm_eps=t["layer_norm_eps"],
                      hidden_dropout=t["hidden_dropout_prob"], attention_dropout=t["attention_probs_dropout_prob"],
                      hidden_act=t["hidden_act"], pad_token_id=t["pad_token_id"], bos_token_id=t["bos_token_id"],
                      sep_token_id=t["sep_token_id"], label_smoothing=t["label_smoothing"])
    cfg = ModelConfig(kind=ARCH_KIND[arch], vision=vision, text=text,
                      embed_dim=d.get("image_text_hidden_size", 256))
    return cfg, d


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """``model.safetensors`` (or its sharded index) or ``pytorch_model.bin``, renamed to our keys."""
    if (path / "model.safetensors").is_file():
        raw = read_tensor_file(path / "model.safetensors")
    elif (path / "model.safetensors.index.json").is_file():
        try:
            index = json.loads((path / "model.safetensors.index.json").read_text())
            shards = sorted(set(index["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{path / 'model.safetensors.index.json'}: unusable ({e})") from None
        raw = {}
        for shard in shards:
            if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard.startswith("."):
                raise CheckpointError(f"{path}: weight shard name {shard!r} is not a file in that directory")
            raw.update(read_tensor_file(path / shard))
    elif (path / "pytorch_model.bin").is_file():
        raw = read_tensor_file(path / "pytorch_model.bin")
    else:
        raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin")
    return {hf_to_ours(k): v for k, v in raw.items()}


def hf_config_dict(model) -> dict:
    """HF ``config.json`` with every value that differs from HF's defaults written explicitly."""
    cfg = model.cfg
    kind = cfg.kind
    if kind not in KIND_ARCH:
        raise CheckpointError(f"a '{kind}' model has no HF transformers class (HF has BLIP captioning, "
                              "retrieval/ITM and VQA only); save it as 'fastblip' or 'official'")
    v, t = cfg.vision, cfg.text
    if kind == "vqa" and v.width != t.hidden_size:
        raise CheckpointError(f"HF's BlipForQuestionAnswering needs vision width == text width, got {v.width} "
                              f"and {t.hidden_size}")
    text = dict(model_type="blip_text_model", vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                encoder_hidden_size=v.width, intermediate_size=t.intermediate_size,
                num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                max_position_embeddings=t.max_position_embeddings, hidden_act=t.hidden_act,
                layer_norm_eps=t.layer_norm_eps, hidden_dropout_prob=t.hidden_dropout,
                attention_probs_dropout_prob=t.attention_dropout, bos_token_id=t.bos_token_id,
                pad_token_id=t.pad_token_id, sep_token_id=t.sep_token_id, eos_token_id=t.sep_token_id,
                label_smoothing=t.label_smoothing, is_decoder=True, tie_word_embeddings=True)
    vision = dict(model_type="blip_vision_model", hidden_size=v.width, intermediate_size=int(v.width * v.mlp_ratio),
                  num_hidden_layers=v.depth, num_attention_heads=v.heads, image_size=v.image_size,
                  patch_size=v.patch_size, hidden_act="gelu", layer_norm_eps=v.layer_norm_eps,
                  attention_dropout=0.0)
    return dict(architectures=[KIND_ARCH[kind]], model_type="blip", text_config=text, vision_config=vision,
                image_text_hidden_size=cfg.embed_dim, label_smoothing=t.label_smoothing,
                tie_word_embeddings=True)


# tensors of our models that no HF class has (momentum encoders, queues, temperature)
_NOT_IN_HF = ("visual_encoder_m.", "vision_proj_m.", "text_encoder_m.", "text_proj_m.", "image_queue",
              "text_queue", "idx_queue", "ptr_queue", "queue_ptr", "temp")


def not_in_hf(model) -> list[str]:
    """The model's training-only tensors that no HF BLIP class has (momentum encoders, queues, the ITC
    temperature), by top-level name: what an HF export leaves out. Inference does not use them (the contract's
    ``itc_similarity`` is a plain cosine)."""
    return sorted({k.split(".")[0] for k in model.state_dict() if k.startswith(_NOT_IN_HF)})


def save_hf_dir(model, path: Path) -> Path:
    """Write the HF directory into ``path`` as is (``fastblip.save`` gives a temp directory it then renames)."""
    from fastblip.checkpoints.io import save_safetensors

    conf = hf_config_dict(model)
    sd = {}
    for k, t in model.state_dict().items():
        if k.startswith(_NOT_IN_HF):
            continue
        if k in ("text_decoder.cls.predictions.decoder.weight", "text_decoder.cls.predictions.decoder.bias"):
            continue  # tied (HF re-ties them from word_embeddings / predictions.bias, as its own files do)
        sd[ours_to_hf(k)] = t.detach().cpu().clone().contiguous()
    left_out = not_in_hf(model)
    if left_out:  # expected: HF's classes are inference models (INFO: shown with -v; convert names them)
        log.info("HF %s export leaves out training-only tensors it has no place for: %s", conf["architectures"][0],
                 ", ".join(left_out))
    path.mkdir(parents=True, exist_ok=True)
    save_safetensors(sd, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(conf, indent=2))
    model.tokenizer.save(path)
    return path

"""Zero-shot video-language transfer (official ``eval_retrieval_video.py``, BLIP paper §5.6).

Frames: decoded with PyAV (the ``video`` extra) in the loader workers (``video_loader``: the one data pipeline,
so an unreadable video is skipped and counted), ``num_frames`` (8) uniformly sampled as the official loader's
"uniform" strategy (indices ``arange(0, n, n / num_frames)``), each resized bicubic to the model's image size
and normalised as images.
- Text-to-video retrieval: ITC video feature = L2-normalise(mean over frames of ``vision_proj(frame [CLS])``)
  (the official code averages the projected features and normalises the mean); the top ``k_test`` candidates
  are re-ranked by ITM match logit + ITC cosine with the ``[ENC]`` encoder cross-attending to all frames'
  tokens concatenated (8 x N tokens), then recall@1/5/10 as image-text retrieval (``img_*`` = video).
- Video QA: the VQA model's question encoder cross-attends to all frames' tokens concatenated.

Legend: V videos, F frames per video, N tokens per frame, C vision width, T texts.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from fastblip.data.video import decode_video, sample_indices
from fastblip.errors import InputError, NotFoundError

__all__ = ["decode_video", "encode_videos", "evaluate_video_retrieval", "load_video_frames", "sample_indices",
           "video_loader", "video_qa"]


def load_video_frames(path: str | Path, num_frames: int = 8, image_size: int = 384) -> torch.Tensor:
    """(F, 3, S, S) normalised frames of one video file (what the loader's video format yields per sample)."""
    from fastblip.data.transforms import eval_transform

    p = Path(path)
    if not p.is_file():
        raise NotFoundError(f"video not found: {p}")
    tf = eval_transform(image_size)
    return torch.stack([tf(Image.fromarray(f)) for f in decode_video(p.read_bytes(), num_frames)])


def video_loader(sources, *, image_size: int, num_frames: int = 8, batch_size: int = 4, mode: str = "retrieval",
                 video_root: str = "", video_ext: str = ".mp4", max_words: int = 30, num_workers: int = 0):
    """The evaluation loader of MSRVTT-style JSON files: ``VideoBatch``es through the one data pipeline (an
    unreadable video is skipped and counted in ``loader.stats``, with its caption)."""
    from fastblip.data import VideoFormat, build_loader

    fmt = VideoFormat(num_frames, mode, video_root, video_ext, max_words)
    return build_loader(sources, image_size=image_size, batch_size=batch_size, train=False, fmt=fmt,
                        num_workers=num_workers)


@torch.no_grad()
def encode_videos(model, frames_VF: torch.Tensor, with_features: bool = True):
    """frames (V, F, 3, S, S) -> (tokens (V, F*N, C), ITC features (V, D) or None)."""
    V, Fr = frames_VF.shape[:2]
    emb = model.encode_image(frames_VF.flatten(0, 1))  # (V*F, N, C)
    feat = None
    if with_features:
        feat = F.normalize(model.vision_proj(emb[:, 0]).float().view(V, Fr, -1).mean(dim=1), dim=-1)
    return emb.reshape(V, Fr * emb.shape[1], emb.shape[2]), feat


@torch.no_grad()
def evaluate_video_retrieval(model, videos, *, k_test: int = 128, max_length: int = 35, rank: int = 0,
                             world_size: int = 1) -> dict[str, float]:
    """Recall@K of text-to-video (``img_r*``) and video-to-text (``txt_r*``) over ``VideoBatch``es (each
    video with its cleaned caption; ``video_loader``)."""
    from fastblip.eval.retrieval import recall_at_k, score_matrices

    dev = model.device
    tokens, feats, captions = [], [], []
    for b in videos:
        t, f = encode_videos(model, b.pixel_values.to(dev))
        tokens.append(t)
        feats.append(f)
        captions += b.texts
    if not captions:
        raise InputError("video retrieval: the loader yielded no readable video")
    tokens_V, feat_VD = torch.cat(tokens), torch.cat(feats)
    enc = model.tokenizer(captions, max_length=max_length, padding="longest")
    ids, mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
    text_TD = F.normalize(model.text_proj(model.text_encoder(ids, mask)[:, 0]).float(), dim=-1)
    s_v2t, s_t2v = score_matrices(model, tokens_V, ids, mask, feat_VD @ text_TD.t(), k_test, rank=rank,
                                  world_size=world_size)
    n = len(captions)
    return recall_at_k(s_v2t, s_t2v, list(range(n)), [[i] for i in range(n)])


@torch.no_grad()
def video_qa(model, videos, *, answer_list: list[str] | None = None, method: str = "rank",
             k_test: int = 128) -> tuple[list[str], list[str | None]]:
    """(answers, gold answers) of a VQA model over ``VideoBatch``es in ``qa`` mode (questions cleaned by
    ``pre_question``); the question encoder cross-attends to all frames' tokens concatenated."""
    dev = model.device
    out: list[str] = []
    gold: list[str | None] = []
    for b in videos:
        tokens, _ = encode_videos(model, b.pixel_values.to(dev), with_features=False)
        out += model.answer(None, b.texts, method=method, answer_list=answer_list, k_test=k_test,
                            image_embeds=tokens)
        gold += b.answers
    return out, gold

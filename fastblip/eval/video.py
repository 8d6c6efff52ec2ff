"""Zero-shot video-language transfer (official ``eval_retrieval_video.py``, BLIP paper §5.6).

Frames: decoded with PyAV (the ``video`` extra), ``num_frames`` (8) uniformly sampled as the official loader's
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

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fastblip.errors import InputError, MissingDependencyError, NotFoundError


class VideoDecodeError(InputError):
    """A video file that cannot be read."""


def sample_indices(num_total: int, num_frames: int) -> np.ndarray:
    """Official uniform sampling; videos shorter than ``num_frames`` repeat frames."""
    if num_total < 1:
        raise VideoDecodeError("video has no frames")
    if num_total >= num_frames:
        return np.arange(0, num_total, num_total / num_frames).astype(int)[:num_frames]
    return np.linspace(0, num_total - 1, num_frames).round().astype(int)


def load_video_frames(path: str | Path, num_frames: int = 8, image_size: int = 384) -> torch.Tensor:
    """(F, 3, S, S) normalised frames of one video file."""
    try:
        import av
    except ImportError as e:  # pragma: no cover - av is in the `video` extra
        raise MissingDependencyError("video decoding needs PyAV: pip install 'fastblip[video]'") from e
    from fastblip.data.transforms import to_tensor_normalized

    p = Path(path)
    if not p.is_file():
        raise NotFoundError(f"video not found: {p}")
    try:
        with av.open(str(p)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except av.error.FFmpegError as e:
        raise VideoDecodeError(f"{p}: cannot decode ({e})") from None
    idx = sample_indices(len(frames), num_frames)
    return torch.stack([to_tensor_normalized(Image.fromarray(frames[i]).resize((image_size, image_size),
                                                                               Image.BICUBIC)) for i in idx])


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
def evaluate_video_retrieval(model, video_paths: list[str | Path], captions: list[str], *, num_frames: int = 8,
                             k_test: int = 128, max_words: int = 30, max_length: int = 35, video_batch: int = 4,
                             rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """Recall@K of text-to-video (``img_r*``) and video-to-text (``txt_r*``); caption i describes video i."""
    from fastblip.data.text import pre_caption
    from fastblip.eval.retrieval import recall_at_k, score_matrices

    if len(video_paths) != len(captions) or not captions:
        raise ValueError(f"need one caption per video, got {len(video_paths)} videos and {len(captions)} captions")
    dev, S = model.device, model.cfg.vision.image_size
    tokens, feats = [], []
    for a in range(0, len(video_paths), video_batch):
        fr = torch.stack([load_video_frames(p, num_frames, S) for p in video_paths[a:a + video_batch]]).to(dev)
        t, f = encode_videos(model, fr)
        tokens.append(t)
        feats.append(f)
    tokens_V, feat_VD = torch.cat(tokens), torch.cat(feats)
    enc = model.tokenizer([pre_caption(c, max_words) for c in captions], max_length=max_length, padding="longest")
    ids, mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
    text_TD = F.normalize(model.text_proj(model.text_encoder(ids, mask)[:, 0]).float(), dim=-1)
    s_v2t, s_t2v = score_matrices(model, tokens_V, ids, mask, feat_VD @ text_TD.t(), k_test, rank=rank,
                                  world_size=world_size)
    n = len(captions)
    return recall_at_k(s_v2t, s_t2v, list(range(n)), [[i] for i in range(n)])


@torch.no_grad()
def video_qa(model, video_paths: list[str | Path], questions: list[str], *, answer_list: list[str] | None = None,
             method: str = "rank", num_frames: int = 8, k_test: int = 128, video_batch: int = 4) -> list[str]:
    """Answers from a VQA model on each video's frames (tokens of all frames concatenated)."""
    from fastblip.tasks.vqa import pre_question

    if len(video_paths) != len(questions):
        raise ValueError(f"{len(video_paths)} videos but {len(questions)} questions")
    dev, S = model.device, model.cfg.vision.image_size
    out: list[str] = []
    for a in range(0, len(video_paths), video_batch):
        fr = torch.stack([load_video_frames(p, num_frames, S) for p in video_paths[a:a + video_batch]]).to(dev)
        tokens, _ = encode_videos(model, fr, with_features=False)
        out += model.answer(None, [pre_question(q) for q in questions[a:a + video_batch]], method=method,
                            answer_list=answer_list, k_test=k_test, image_embeds=tokens)
    return out

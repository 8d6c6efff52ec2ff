"""Video decoding for the loader's video format (formats.VideoFormat): PyAV (the ``video`` extra), frames
sampled as the official loader's "uniform" strategy."""

from __future__ import annotations

import io

import numpy as np

from fastblip.errors import MissingDependencyError

from .decode import DecodeError


def sample_indices(num_total: int, num_frames: int) -> np.ndarray:
    """Official uniform sampling; videos shorter than ``num_frames`` repeat frames."""
    if num_total < 1:
        raise DecodeError("corrupt_video", "video has no frames")
    if num_total >= num_frames:
        return np.arange(0, num_total, num_total / num_frames).astype(int)[:num_frames]
    return np.linspace(0, num_total - 1, num_frames).round().astype(int)


def decode_video(data: bytes, num_frames: int = 8) -> list[np.ndarray]:
    """``num_frames`` uniformly sampled RGB frames (H, W, 3) uint8 of an encoded video; DecodeError
    ``corrupt_video`` when PyAV cannot read it (what the loader skips and counts)."""
    try:
        import av
    except ImportError as e:  # pragma: no cover - av is in the `video` extra
        raise MissingDependencyError("video decoding needs PyAV: pip install 'fastblip[video]'") from e
    if not data:
        raise DecodeError("corrupt_video", "empty file")
    try:
        with av.open(io.BytesIO(data)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.error.FFmpegError, ValueError, IndexError, StopIteration) as e:  # no video stream: IndexError
        raise DecodeError("corrupt_video", f"cannot decode ({e})") from None
    return [frames[i] for i in sample_indices(len(frames), num_frames)]

"""fastblip: BLIP (Li et al. 2022, arXiv 2201.12086) rebuilt for speed.

    import fastblip
    model = fastblip.load("model_base_capfilt_large.pth")      # official .pth, HF dir or fastblip dir
    proc = fastblip.Processor(image_size=model.cfg.vision.image_size)
"""

from __future__ import annotations

__version__ = "0.1.0"

from fastblip.errors import FastblipError  # noqa: E402  (no torch: `import fastblip` stays cheap)

__all__ = ["load", "save", "convert", "Processor", "build_model", "ModelConfig", "FastblipError", "__version__"]


def __getattr__(name: str):
    # lazy: `import fastblip` stays cheap (the CLI's --help does not import torch-heavy modules)
    if name in ("load", "save", "convert"):
        from fastblip import checkpoints

        return getattr(checkpoints, name)
    if name == "Processor":
        from fastblip.processor import Processor

        return Processor
    if name == "build_model":
        from fastblip.models import build_model

        return build_model
    if name == "ModelConfig":
        from fastblip.config import ModelConfig

        return ModelConfig
    raise AttributeError(f"module 'fastblip' has no attribute '{name}'")

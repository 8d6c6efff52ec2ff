"""BLIP's models: ``build_model(cfg)`` builds the task model ``cfg.kind`` names (fastblip/models/factory.py
states the import rule that keeps this package free of cycles)."""

from fastblip.models.factory import build_model

__all__ = ["build_model"]

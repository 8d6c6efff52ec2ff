"""Build any BLIP task model from its config (``ModelConfig.kind``).

Architecture rule (checked by tests/test_architecture.py): the import graph of ``fastblip.models`` has no
cycle. ``base`` (the shared ViT holder and public-method mixins), ``med``, ``vit``, ``contrastive`` (momentum
encoders, queues, the ITC step) and ``generation`` sit below the task models (``blip_pretrain``,
``blip_retrieval``, ``blip_caption``, ``blip_vqa``, ``blip_nlvr``); this factory sits above them all and only
it names every task model. Models call ``fastblip.ops`` (which picks a kernel), never ``fastblip.kernels``.
"""

from __future__ import annotations

from fastblip.config import ModelConfig
from fastblip.errors import ConfigError
from fastblip.models.base import BlipBase


def build_model(cfg: ModelConfig) -> BlipBase:
    """Build the task model named by ``cfg.kind`` (random init)."""
    kind = cfg.kind
    if kind == "pretrain":
        from fastblip.models.blip_pretrain import BlipPretrain

        return BlipPretrain(cfg)
    if kind in ("retrieval", "itm"):
        from fastblip.models.blip_retrieval import BlipRetrieval

        m = BlipRetrieval(cfg, momentum=kind == "retrieval")
        m.kind = kind
        return m
    if kind == "caption":
        from fastblip.models.blip_caption import BlipCaption

        return BlipCaption(cfg)
    if kind == "vqa":
        from fastblip.models.blip_vqa import BlipVQA

        return BlipVQA(cfg)
    if kind == "nlvr":
        from fastblip.models.blip_nlvr import BlipNLVR

        return BlipNLVR(cfg)
    raise ConfigError(f"unknown model kind '{kind}' (valid: pretrain, retrieval, itm, caption, vqa, nlvr)")

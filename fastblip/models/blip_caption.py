"""The BLIP captioner (official ``BLIP_Decoder``): ViT + causal decoder with cross-attention and the LM head.

Module tree and parameter names follow the official code so ``model_base_caption*.pth`` maps key for key.
"""

from __future__ import annotations

import torch

from fastblip.config import ModelConfig
from fastblip.models.base import BlipBase, CaptionMixin
from fastblip.models.med import BertLMHeadModel
from fastblip.ops import lm_cross_entropy


class BlipCaption(CaptionMixin, BlipBase):
    """Captioner: ViT + causal decoder with cross-attention and the LM head (official ``BLIP_Decoder``)."""

    kind = "caption"

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.text_decoder = BertLMHeadModel(cfg.text, encoder_width=cfg.vision.width)
        self._prompt_len: tuple[str, int] | None = None
        self.prompt_len()  # as the official __init__: tokenised once, never inside a (compiled) training step
        self.set_backends()

    def forward(self, pixel_values, input_ids, attention_mask, prompt_len: int = 0) -> dict:
        """Captioning LM loss: [DEC] first, pads and the prompt masked (-100), label smoothing of the config."""
        ids = self._with_first(input_ids, self.cfg.text.bos_token_id)
        image = self.text_decoder.bert.image_kv(self.encode_image(pixel_values))
        hidden = self.text_decoder.hidden(ids, attention_mask, image)
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        if prompt_len:
            labels[:, :prompt_len] = -100
        h = self.text_decoder.head_hidden(hidden[:, :-1])
        head = self.text_decoder.cls.predictions
        loss = lm_cross_entropy(h.reshape(-1, h.shape[-1]), head.decoder.weight, head.bias,
                                labels[:, 1:].reshape(-1), label_smoothing=self.cfg.text.label_smoothing,
                                backend=self.op_backend("lm_cross_entropy"))
        return {"lm_loss": loss, "loss": loss}

    def training_step(self, batch, *, alpha: float | torch.Tensor = 0.0, update_momentum: bool = True) -> dict:
        """The task contract: captioning finetune step; the batch's texts already start with the prompt
        ("a picture of "). No momentum encoders: the flags are ignored."""
        return self(batch.pixel_values, batch.input_ids, batch.attention_mask, prompt_len=self.prompt_len())

    def prompt_len(self) -> int:
        """Number of prompt tokens masked from the loss ([DEC] + prompt words, as the official code); computed
        once (tokenising inside a compiled training step would break its graph)."""
        if self._prompt_len is None or self._prompt_len[0] != self.cfg.prompt:
            n = len(self.tokenizer.encode(self.cfg.prompt)) - 1 if self.cfg.prompt else 0
            self._prompt_len = (self.cfg.prompt, n)
        return self._prompt_len[1]

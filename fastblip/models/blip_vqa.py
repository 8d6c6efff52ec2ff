"""VQA model (official ``BLIP_VQA`` layout, BLIP_SPEC §4): ViT + image-grounded question encoder + answer decoder.

Keys: ``visual_encoder.*``, ``text_encoder.*`` (BERT with cross-attention to the image, K/V width = vision
width), ``text_decoder.bert.*`` + ``text_decoder.cls.*`` (the answer decoder cross-attends to the *question
encoder's outputs*, so its cross-attention K/V width is the text width, 768 for base).

Inference (official ``forward(train=False)``):
- ``rank``: the first answer token's probability after ``[DEC]`` selects the top-k answers of the list, which are
  then rescored by the decoder's full-answer loss (label-smoothed per token, summed per sequence); highest
  ``-loss`` wins. The question states' K/V are projected once per question and shared by its k candidates
  (``ImageKV.kv_index``) instead of tiling the states k times as the official ``tile`` does.
- ``generate``: beam search (3 beams, max 10, min 1) from ``[DEC]``; as the official code and HF, the decoder
  attends to *every* question position (an all-ones mask, padding included).

Legend: B questions, Lq question length, La answer length, A answers in the list, K top-k, C text width.
"""

from __future__ import annotations

import torch

from fastblip.config import ModelConfig
from fastblip.models.base import BlipBase
from fastblip.models.med import BertLMHeadModel, BertModel, ImageKV


class BlipVQA(BlipBase):
    """VQA: ``answer(pixel_values, questions, method="rank"|"generate", answer_list=...) -> list[str]``."""

    kind = "vqa"
    question_max_length = 35  # official tokenizer call: truncation, max_length=35

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.text_encoder = BertModel(cfg.text, encoder_width=cfg.vision.width)
        self.text_decoder = BertLMHeadModel(cfg.text, encoder_width=cfg.text.hidden_size)
        self._answer_cache: tuple[tuple[str, ...], torch.Tensor, torch.Tensor] | None = None
        self.set_backends()

    # ------------------------------------------------------------------ pieces
    def _tokenize(self, texts: list[str], max_length: int = 35) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(list(texts), max_length=max_length, padding="longest")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def encode_question(self, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor) -> torch.Tensor:
        """[ENC]-first question encoded with cross-attention to the image: (B, Lq, C)."""
        ids = self._with_first(input_ids, self.cfg.text.enc_token_id)
        return self.text_encoder(ids, attention_mask, image=self.text_encoder.image_kv(image_embeds))

    def _question_kv(self, q_BLC: torch.Tensor, q_mask: torch.Tensor | None) -> ImageKV:
        mask = q_mask.bool() if q_mask is not None else None
        return self.text_decoder.bert.image_kv(q_BLC, mask)

    def answer_losses(self, q_kv: ImageKV, answer_ids: torch.Tensor, answer_mask: torch.Tensor,
                      label_smoothing: float | None = None) -> torch.Tensor:
        """Per-sequence decoder loss (N,) of ``[DEC]``-first answers: label-smoothed per-token CE summed over the
        answer's tokens (pads ignored), the official ``reduction='none'`` loss. ``q_kv.kv_index`` maps rows."""
        from fastblip.ops import lm_cross_entropy

        ids = self._with_first(answer_ids, self.cfg.text.bos_token_id)
        hidden = self.text_decoder.hidden(ids, answer_mask, q_kv)
        labels = answer_ids.masked_fill(answer_mask == 0, -100)[:, 1:]
        h = self.text_decoder.head_hidden(hidden[:, :-1])
        head = self.text_decoder.cls.predictions
        ls = self.cfg.text.label_smoothing if label_smoothing is None else label_smoothing
        tok = lm_cross_entropy(h.reshape(-1, h.shape[-1]), head.decoder.weight, head.bias, labels.reshape(-1),
                               label_smoothing=ls, reduction="none", backend=self.op_backend("lm_cross_entropy"))
        return tok.view(labels.shape).sum(1)

    # ------------------------------------------------------------------ training
    def forward(self, pixel_values: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor,
                answer_ids: torch.Tensor, answer_mask: torch.Tensor, n: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        """Official training loss: each question's answers (``n[b]`` rows of ``answer_ids``) decoded against its
        states, per-answer losses weighted (VQA: count/10 per unique answer; VG: 0.2), summed, / B."""
        q = self.encode_question(self.encode_image(pixel_values), question_ids, question_mask)
        q_kv = self._question_kv(q, question_mask)
        # output_size from the answers' own shape: no host sync to size the result
        q_kv = q_kv.select(torch.repeat_interleave(torch.arange(q.shape[0], device=q.device), n.to(q.device),
                                                   output_size=answer_ids.shape[0]))
        loss = self.answer_losses(q_kv, answer_ids, answer_mask)
        return (weights.to(loss.dtype) * loss).sum() / pixel_values.shape[0]

    def training_step(self, batch, *, alpha: float | torch.Tensor = 0.0, update_momentum: bool = True) -> dict:
        """The task contract; ``batch`` is a ``fastblip.tasks.vqa.VQABatch`` (no momentum encoders: the flags
        are ignored)."""
        loss = self(batch.pixel_values, batch.input_ids, batch.attention_mask, batch.answer_ids,
                    batch.answer_mask, batch.n, batch.weights)
        return {"vqa_loss": loss, "loss": loss}

    # ------------------------------------------------------------------ inference
    def _answer_candidates(self, answer_list: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        key = tuple(answer_list)
        if self._answer_cache is None or self._answer_cache[0] != key or self._answer_cache[1].device != self.device:
            ids, mask = self._tokenize(list(answer_list), max_length=512)
            self._answer_cache = (key, ids, mask)
        return self._answer_cache[1], self._answer_cache[2]

    @torch.no_grad()
    def rank_answers(self, q_BLC: torch.Tensor, q_mask: torch.Tensor, answer_ids: torch.Tensor,
                     answer_mask: torch.Tensor, k: int = 128) -> torch.Tensor:
        """Official ``rank_answer``: (B,) index into the answer list. ``k`` is clamped to the list size (the
        official ``topk`` would fail on lists shorter than k)."""
        B, A = q_BLC.shape[0], answer_ids.shape[0]
        k = min(k, A)
        q_kv = self._question_kv(q_BLC, q_mask)
        start = torch.full((B, 1), self.cfg.text.bos_token_id, dtype=torch.long, device=q_BLC.device)
        logits_BV = self.text_decoder(start, None, q_kv)[:, 0].float()
        prob_BA = logits_BV.softmax(dim=1).index_select(1, answer_ids[:, 1])
        _, topk_ids = prob_BA.topk(k, dim=1)  # (B, K)
        flat = topk_ids.reshape(-1)
        q_kv = q_kv.select(torch.arange(B, device=q_BLC.device).repeat_interleave(k))
        ids, mask = answer_ids.index_select(0, flat), answer_mask.index_select(0, flat)
        L = int(mask.sum(1).max())  # sync: trim the candidates' common padding (losses unchanged)
        logp = -self.answer_losses(q_kv, ids[:, :L], mask[:, :L]).view(B, k)
        return topk_ids.gather(1, logp.argmax(dim=1, keepdim=True)).squeeze(1)

    @torch.no_grad()
    def generate_answer_ids(self, q_BLC: torch.Tensor, num_beams: int = 3, max_length: int = 10,
                            min_length: int = 1) -> torch.Tensor:
        from fastblip.models.generation import _Decoder, beam_search

        B = q_BLC.shape[0]
        t = self.cfg.text
        q_kv = self._question_kv(q_BLC, None)  # all-ones question mask, as the official/HF generate
        q_kv = q_kv.select(torch.arange(B, device=q_BLC.device).repeat_interleave(num_beams))
        ids = torch.full((B * num_beams, 1), t.bos_token_id, dtype=torch.long, device=q_BLC.device)
        return beam_search(_Decoder(self.text_decoder, q_kv), ids, num_beams=num_beams, max_length=max_length,
                           min_length=min_length, eos=t.sep_token_id, pad=t.pad_token_id)

    @torch.no_grad()
    def answer(self, pixel_values: torch.Tensor | None, questions: list[str] | torch.Tensor,
               method: str = "rank", answer_list: list[str] | None = None, k_test: int = 128,
               attention_mask: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None,
               num_beams: int = 3, max_length: int = 10, min_length: int = 1) -> list[str]:
        """Answers as strings. ``questions``: strings (tokenised here, max 35 tokens; apply ``pre_question``
        first as the official dataset does) or plain ``[CLS]``-first ids with ``attention_mask``.
        ``image_embeds`` (B, N, Cv) replaces the ViT (video QA feeds all frames' tokens concatenated)."""
        if method not in ("rank", "generate"):
            raise ValueError(f"unknown VQA inference method '{method}' (rank or generate)")
        if method == "rank" and not answer_list:
            raise ValueError("method='rank' needs a non-empty answer_list")
        if isinstance(questions, torch.Tensor):
            ids = questions.to(self.device)
            mask = attention_mask.to(self.device) if attention_mask is not None else torch.ones_like(ids)
        else:
            ids, mask = self._tokenize(list(questions), self.question_max_length)
        emb = self.encode_image(pixel_values) if image_embeds is None else image_embeds
        if emb.shape[0] != ids.shape[0]:
            raise ValueError(f"{emb.shape[0]} images but {ids.shape[0]} questions")
        q = self.encode_question(emb, ids, mask)
        if method == "generate":
            out = self.generate_answer_ids(q, num_beams=num_beams, max_length=max_length, min_length=min_length)
            return self.tokenizer.batch_decode(out.tolist(), skip_special_tokens=True)
        a_ids, a_mask = self._answer_candidates(answer_list)
        best = self.rank_answers(q, mask, a_ids, a_mask, k_test)
        return [answer_list[i] for i in best.tolist()]


"""Caption generation: greedy, beam search and nucleus sampling with a KV cache.

Semantics follow HF ``generate`` as the official captioner calls it (BLIP_SPEC §4): lengths count the prompt
tokens (``max_length``/``min_length``), ``[SEP]`` ends a hypothesis, pads fill finished rows, beam search is HF's
(length penalty over the hypothesis length, ``early_stopping=False`` heuristic), nucleus sampling applies the
repetition penalty, then top-k (HF's default 50), then top-p.

Speed: each image's cross-attention K/V is projected once per layer and shared by all its beams/samples through
``ImageKV.kv_index``; self-attention uses a KV cache; nothing syncs with the host inside a step except the
"all rows finished?" check (one sync per token, labelled below).

Sampling randomness is counter-based: each row has a 64-bit seed and the uniform at step t is a hash of
(seed, t), so a row's caption does not depend on batch composition or on which rank generated it.
"""

from __future__ import annotations

import torch

from fastblip.models.med import ImageKV

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2^32 without int64 overflow: split c in 16-bit halves (products < 2^48)
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + ((x * hi) & 0xFFFF) * 65536) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash (Wellons), on int64 tensors holding 32-bit values."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniform(seeds: torch.Tensor, step: int) -> torch.Tensor:
    """(N,) int64 seeds -> (N,) float64 uniforms in [0, 1), a pure function of (seed, step)."""
    lo, hi = seeds & _M32, (seeds >> 32) & _M32
    h = _mix32(lo ^ _mix32(hi ^ _mix32(torch.full_like(seeds, step) + 0x9E3779B9)))
    return (h >> 8).double() / float(1 << 24)


def prompt_ids(model, prompt: str, device) -> torch.Tensor:
    """Prompt as the official captioner builds it: ``[DEC]`` replaces ``[CLS]``, the final ``[SEP]`` dropped."""
    ids = model.tokenizer([prompt], padding="longest")["input_ids"].to(device)
    ids[:, 0] = model.cfg.text.bos_token_id
    return ids[:, :-1]


class _Decoder:
    """Step function over the shared-weight decoder with a KV cache and shared image K/V."""

    def __init__(self, decoder, image: ImageKV):
        self.decoder, self.image, self.past = decoder, image, None

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        logits, self.past = self.decoder(ids, None, self.image, past=self.past, use_cache=True)
        return logits[:, -1].float()

    def reorder(self, index: torch.Tensor) -> None:
        self.past = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.past]
        self.image = self.image.select(index)


def _repetition_penalty(scores: torch.Tensor, seqs: torch.Tensor, penalty: float) -> torch.Tensor:
    if penalty == 1.0:
        return scores
    s = scores.gather(1, seqs)
    s = torch.where(s < 0, s * penalty, s / penalty)
    return scores.scatter(1, seqs, s)


def _min_length(scores: torch.Tensor, cur_len: int, min_length: int, eos: int) -> torch.Tensor:
    if cur_len < min_length:
        scores = scores.clone()
        scores[:, eos] = float("-inf")
    return scores


def _top_k_top_p(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k and top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]))[0][:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(scores, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - top_p)
        remove[:, -1:] = False  # keep at least one token
        scores = scores.masked_fill(remove.scatter(1, sorted_idx, remove), float("-inf"))
    return scores


@torch.no_grad()
def greedy_or_sample(step: _Decoder, ids: torch.Tensor, *, max_length: int, min_length: int, eos: int, pad: int,
                     sample: bool, top_k: int, top_p: float, temperature: float, repetition_penalty: float,
                     seeds: torch.Tensor | None) -> torch.Tensor:
    """HF ``_sample`` semantics; returns (N, L) ids including the prompt, pads after [SEP]."""
    unfinished = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    new = ids
    while ids.shape[1] < max_length:
        scores = step(new)
        scores = _repetition_penalty(scores, ids, repetition_penalty)
        scores = _min_length(scores, ids.shape[1], min_length, eos)
        if sample:
            if temperature != 1.0:
                scores = scores / temperature
            probs = _top_k_top_p(scores, top_k, top_p).softmax(dim=-1).double()
            u = counter_uniform(seeds, ids.shape[1])  # inverse-CDF draw from a per-row counter-based uniform
            cdf = probs.cumsum(dim=-1)
            nxt = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=probs.shape[1] - 1)
            nxt = nxt.squeeze(1)
        else:
            nxt = scores.argmax(dim=-1)
        nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad))
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        unfinished = unfinished & (nxt != eos)
        new = nxt[:, None]
        if not bool(unfinished.any()):  # sync: one per generated token, to stop early like HF
            break
    return ids


@torch.no_grad()
def beam_search(step: _Decoder, ids: torch.Tensor, *, num_beams: int, max_length: int, min_length: int, eos: int,
                pad: int, length_penalty: float = 1.0, repetition_penalty: float = 1.0,
                num_return_sequences: int = 1, length_includes_prompt: bool = False) -> torch.Tensor:
    """HF's vectorised beam search (``early_stopping=False``). ``ids`` (B*num_beams, P) rows grouped per item.

    ``length_includes_prompt`` normalises scores by the full length (the transformers version the official code
    ran, 4.15) instead of the generated length (current transformers, the parity oracle).
    """
    BK, prompt_len = ids.shape
    B, K = BK // num_beams, num_beams
    dev = ids.device
    keep = 2 * K  # beams_to_keep for one eos token
    off = 0 if length_includes_prompt else prompt_len
    running = torch.full((B, K, max_length), pad, dtype=torch.long, device=dev)
    running[:, :, :prompt_len] = ids.view(B, K, prompt_len)
    finished = running.clone()
    run_scores = torch.zeros(B, K, device=dev)
    run_scores[:, 1:] = -1e9
    fin_scores = torch.full((B, K), -1e9, device=dev)
    fin_done = torch.zeros(B, K, dtype=torch.bool, device=dev)
    fin_len = torch.full((B, K), prompt_len, dtype=torch.long, device=dev)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
    top_mask = torch.arange(keep, device=dev) < K
    batch_off = (torch.arange(B, device=dev) * K)[:, None]
    cur = prompt_len
    new = ids
    while True:
        logp = step(new).log_softmax(dim=-1)
        flat_seq = running[:, :, :cur].reshape(BK, cur)
        logp = _repetition_penalty(logp, flat_seq, repetition_penalty)
        logp = _min_length(logp, cur, min_length, eos)
        V = logp.shape[-1]
        acc = (logp.view(B, K, V) + run_scores[:, :, None]).view(B, K * V)
        top_lp, top_idx = torch.topk(acc, keep)
        src_beam, tok = top_idx // V, top_idx % V
        cand = running.gather(1, src_beam[:, :, None].expand(B, keep, max_length)).clone()
        cand[:, :, cur] = tok
        hits = (tok == eos) | (cur + 1 >= max_length)
        # running beams for the next step: best K that did not just finish
        r_lp = top_lp + hits.float() * -1e9
        nxt = torch.topk(r_lp, K)[1]
        running = cand.gather(1, nxt[:, :, None].expand(B, K, max_length))
        run_scores = r_lp.gather(1, nxt)
        beam_idx = (src_beam.gather(1, nxt) + batch_off).view(-1)
        # finished hypotheses: only the top-K candidates may finish, scored with the length penalty
        f_lp = top_lp / float(cur + 1 - off) ** length_penalty
        f_lp = f_lp + (~improvable).float() * -1e9
        just = hits & top_mask[None, :]
        f_lp = f_lp + (~just).float() * -1e9
        m_seq = torch.cat([finished, cand], dim=1)
        m_sc = torch.cat([fin_scores, f_lp], dim=1)
        m_done = torch.cat([fin_done, just], dim=1)
        m_len = torch.cat([fin_len, torch.full_like(hits, cur + 1, dtype=torch.long)], dim=1)
        sel = torch.topk(m_sc, K)[1]
        finished = m_seq.gather(1, sel[:, :, None].expand(B, K, max_length))
        fin_scores, fin_done, fin_len = m_sc.gather(1, sel), m_done.gather(1, sel), m_len.gather(1, sel)
        cur += 1
        best_run = run_scores[:, :1] / float(cur - off) ** length_penalty
        worst_fin = torch.where(fin_done, fin_scores.min(dim=1, keepdim=True)[0], torch.full_like(fin_scores, -1e9))
        improvable = improvable & (best_run > worst_fin).any(dim=-1, keepdim=True)
        # sync: one per generated token, the loop condition (as HF's)
        if not bool(improvable.any()) or bool(hits.all()):
            break
        step.reorder(beam_idx)
        new = running[:, :, cur - 1].reshape(BK, 1)
    out = finished[:, :num_return_sequences]
    L = int(fin_len[:, :num_return_sequences].max())  # sync: final trim
    return out.reshape(B * num_return_sequences, max_length)[:, :L]


@torch.no_grad()
def generate_ids(model, pixel_values: torch.Tensor, *, method: str = "beam", num_return_sequences: int = 1,
                 prompt: str = "a picture of ", max_length: int = 20, min_length: int = 5, num_beams: int = 3,
                 top_p: float = 0.9, top_k: int = 50, temperature: float = 1.0,
                 repetition_penalty: float | None = None, length_penalty: float = 1.0,
                 length_includes_prompt: bool = False, seeds: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, image_embeds: torch.Tensor | None = None,
                 ) -> torch.Tensor:
    """Token ids (B * num_return_sequences, L), prompt included; rows grouped per image."""
    if method not in ("beam", "nucleus", "greedy"):
        raise ValueError(f"unknown generation method '{method}' (beam, nucleus or greedy)")
    t = model.cfg.text
    emb = model.encode_image(pixel_values) if image_embeds is None else image_embeds
    B = emb.shape[0]
    decoder = model.text_decoder
    ids0 = prompt_ids(model, prompt, emb.device)
    R = num_beams if method == "beam" else num_return_sequences
    # K/V once per image, shared by every beam/sample
    image = decoder.bert.image_kv(emb).select(torch.arange(B, device=emb.device).repeat_interleave(R))
    ids = ids0.expand(B * R, -1).contiguous()
    step = _Decoder(decoder, image)
    if method == "beam":
        if num_return_sequences > num_beams:
            raise ValueError("num_return_sequences must be <= num_beams for beam search")
        return beam_search(step, ids, num_beams=num_beams, max_length=max_length, min_length=min_length,
                           eos=t.sep_token_id, pad=t.pad_token_id, length_penalty=length_penalty,
                           repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
                           num_return_sequences=num_return_sequences,
                           length_includes_prompt=length_includes_prompt)
    sample = method == "nucleus"
    if sample and seeds is None:
        seeds = torch.randint(0, 2**62, (B * R,), generator=generator).to(emb.device)
    elif sample:
        seeds = seeds.to(emb.device).long()
        if seeds.numel() != B * R:
            raise ValueError(f"seeds must have one entry per generated row ({B * R}), got {seeds.numel()}")
    rp = repetition_penalty if repetition_penalty is not None else (1.1 if sample else 1.0)
    return greedy_or_sample(step, ids, max_length=max_length, min_length=min_length, eos=t.sep_token_id,
                            pad=t.pad_token_id, sample=sample, top_k=top_k, top_p=top_p, temperature=temperature,
                            repetition_penalty=rp, seeds=seeds)


def generate_captions(model, pixel_values: torch.Tensor, *, method: str = "beam", num_return_sequences: int = 1,
                      prompt: str = "a picture of ", **kw) -> list[str] | list[list[str]]:
    """Decoded captions with the prompt removed, as the official ``BLIP_Decoder.generate``."""
    ids = generate_ids(model, pixel_values, method=method, num_return_sequences=num_return_sequences,
                       prompt=prompt, **kw)
    texts = [t[len(prompt):] for t in model.tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)]
    if num_return_sequences == 1:
        return texts
    n = num_return_sequences
    return [texts[i:i + n] for i in range(0, len(texts), n)]

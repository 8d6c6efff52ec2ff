"""Captioning evaluation: beam-search captions scored with pycocoevalcap's BLEU-4 and CIDEr(-D).

As the official ``coco_caption_eval``: references and candidates both go through pycocoevalcap's
``PTBTokenizer`` (the Stanford PTB tokenizer, a Java program; these machines have Java), then ``Bleu(4)`` and
``Cider()``. SPICE is never run (it downloads Stanford CoreNLP at first use). Scores are pycocoevalcap's
fractions (CIDEr 1.333 is the paper's 133.3). Needs the optional ``eval`` extra (``pip install fastblip[eval]``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile

import torch

from fastblip.errors import InputError, MissingDependencyError


class MissingExtraError(MissingDependencyError):
    """An optional dependency group is not installed."""


def _scorers():
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError as e:
        raise MissingExtraError(f"caption metrics need pycocoevalcap: pip install 'fastblip[eval]' ({e})") from None
    return Bleu, Cider, PTBTokenizer


@contextlib.contextmanager
def without_ptb_chatter():
    """The PTB tokenizer (pycocoevalcap's Java program) writes "PTBTokenizer tokenized N tokens at ..." straight
    to file descriptor 2 on every call; a caption evaluation (eval, finetune, demo) drops that line and keeps
    everything else written there meanwhile."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real stderr (captured): nothing reaches a terminal
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            rest = [ln for ln in tmp.read().decode(errors="replace").splitlines(True)
                    if not ln.startswith("PTBTokenizer tokenized")]
            if rest:
                sys.stderr.write("".join(rest))
                sys.stderr.flush()


def caption_scores(candidates: dict, references: dict, tokenize: bool = True) -> dict[str, float]:
    """``candidates`` {image id: caption}, ``references`` {image id: [captions]} -> {"bleu4", "cider"}.

    ``tokenize`` runs the PTB tokenizer (Java) like the official evaluation; False splits on spaces (the
    texts must already be lowercased and punctuation-free)."""
    Bleu, Cider, PTBTokenizer = _scorers()
    missing = set(candidates) ^ set(references)
    if missing:
        raise InputError(f"candidates and references cover different images (e.g. {sorted(missing, key=str)[:3]})")
    if not candidates:
        raise InputError("caption metrics: no captions to score")
    gts = {k: [{"caption": c} for c in v] for k, v in references.items()}
    res = {k: [{"caption": c}] for k, c in candidates.items()}
    if tokenize:
        tok = PTBTokenizer()
        with without_ptb_chatter():
            gts, res = tok.tokenize(gts), tok.tokenize(res)
    else:
        gts = {k: [d["caption"] for d in v] for k, v in gts.items()}
        res = {k: [d["caption"] for d in v] for k, v in res.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}


@torch.no_grad()
def evaluate_captions(model, loader, *, num_beams: int = 3, max_length: int = 20, min_length: int = 5,
                      repetition_penalty: float = 1.0, prompt: str | None = None,
                      dtype: torch.dtype | None = None, return_captions: bool = False):
    """Beam-search a caption for every eval image (BLIP's captioning config: 3 beams, max 20, min 5 tokens,
    the prompt counted) and score them against ``meta["captions"]``."""
    _scorers()  # fail before any generation when the extra is missing
    dev = model.device
    autocast = torch.autocast(dev.type, dtype=dtype) if dtype is not None else torch.autocast(dev.type, enabled=False)
    cands, refs = {}, {}
    with autocast:
        for batch in loader:
            caps = model.generate(batch.pixel_values.to(dev, non_blocking=True), method="beam", num_beams=num_beams,
                                  max_length=max_length, min_length=min_length,
                                  repetition_penalty=repetition_penalty, prompt=prompt)
            for key, m, c in zip(batch.keys, batch.meta, caps, strict=True):
                iid = m.get("image_id", key)
                cands[iid] = c
                refs[iid] = list(m.get("captions") or [m.get("caption")])
    if return_captions:
        return cands, refs
    return caption_scores(cands, refs)

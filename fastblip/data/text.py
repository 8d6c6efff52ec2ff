"""Caption cleaning and captioning-prompt handling, as the official BLIP data code does them.

``pre_caption`` (BLIP_SPEC §3): lowercase; each of ``.!"()*#:;~`` becomes a space; runs of 2+ whitespace
collapse to one space; trailing newline and surrounding spaces stripped; at most ``max_words`` words.
The captioner trains on ``prompt + pre_caption(caption)`` and masks the prompt's tokens from the loss
(``prompt_length`` = prompt tokens without the final ``[SEP]``); generated text drops the prompt.
"""

from __future__ import annotations

import re

DEFAULT_PROMPT = "a picture of "
_PUNCT = re.compile(r"([.!\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")
_QUESTION_PUNCT = re.compile(r"([.!\"()*#:;~])")


def pre_caption(caption: str, max_words: int = 50) -> str:
    caption = _PUNCT.sub(" ", caption.lower())
    caption = _SPACES.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def pre_question(question: str, max_words: int = 50) -> str:
    """Official ``pre_question`` (VQA): lowercase, delete ``.!"()*#:;~``, strip trailing spaces, keep max_words."""
    q = _QUESTION_PUNCT.sub("", question.lower()).rstrip(" ")
    words = q.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else q


def add_prompt(caption: str, prompt: str = DEFAULT_PROMPT) -> str:
    """Training text of the captioner: the prompt, then the cleaned caption (no separator added)."""
    return prompt + caption


def prompt_length(tokenizer, prompt: str = DEFAULT_PROMPT) -> int:
    """Number of leading tokens (``[CLS]``/``[DEC]`` + prompt words) masked from the LM loss."""
    if not prompt:
        return 0
    return len(tokenizer.encode(prompt)) - 1


def strip_prompt(text: str, prompt: str = DEFAULT_PROMPT) -> str:
    """Generated caption minus the prompt (the official captioner slices ``caption[len(prompt):]``)."""
    if prompt and text.startswith(prompt):
        return text[len(prompt) :]
    stripped = prompt.strip()
    if stripped and text.startswith(stripped):
        return text[len(stripped) :].lstrip(" ")
    return text


def clean_caption_bytes(data: bytes | str | None) -> tuple[str | None, str | None]:
    """Decode a caption member: (text, None) when usable, else (None, reason).

    Reasons: ``missing_text`` (no caption), ``bad_caption_encoding`` (not UTF-8), ``empty_caption``
    (empty or whitespace-only once decoded).
    """
    if data is None:
        return None, "missing_text"
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            return None, "bad_caption_encoding"
    if not isinstance(data, str):
        return None, "missing_text"
    if not data.strip():
        return None, "empty_caption"
    return data, None

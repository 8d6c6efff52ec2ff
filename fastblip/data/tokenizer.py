"""BLIP's tokenizer: bert-base-uncased WordPiece plus ``[DEC]`` (bos, id 30522) and ``[ENC]`` (id 30523).

Built on the Rust ``tokenizers`` library (BertNormalizer lowercase + accent strip, BertPreTokenizer,
WordPiece with ``##`` continuation, ``[CLS] $A [SEP]`` template), so tokenisation runs in DataLoader
workers at ~100k captions/s instead of inside the model's forward as the official code does.
Its ids equal ``transformers.BertTokenizer`` on the same vocab (tests/test_tokenizer.py).

Sources, in order (``load_tokenizer``): a checkpoint directory holding ``tokenizer.json`` or ``vocab.txt``;
an explicit ``tokenizer.json`` / ``vocab.txt`` path; else the ``vocab.txt`` shipped in
``fastblip/data/assets`` (bert-base-uncased's 30,522 tokens, Apache-2.0).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from fastblip.errors import InputError, NotFoundError

ASSET_VOCAB = Path(__file__).parent / "assets" / "vocab.txt"
BERT_VOCAB_SIZE = 30522
DEC_TOKEN, ENC_TOKEN = "[DEC]", "[ENC]"


class TokenizerError(InputError):
    """A tokenizer source that cannot be used."""


def _read_vocab(path: Path) -> dict[str, int]:
    vocab: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            vocab[line.rstrip("\n")] = i
    if "[CLS]" not in vocab or "[SEP]" not in vocab or "[PAD]" not in vocab:
        raise TokenizerError(f"{path}: not a BERT vocab.txt (missing [CLS]/[SEP]/[PAD])")
    return vocab


def _build_from_vocab(vocab_file: Path) -> Tokenizer:
    vocab = _read_vocab(vocab_file)
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    # BertTokenizer(do_lower_case=True): clean text, split CJK chars, strip accents, lowercase.
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    return tok


def clean_up_tokenization(text: str) -> str:
    """HF's ``clean_up_tokenization_spaces`` on the joined string (the Rust WordPiece decoder's own
    cleanup runs per token, so it never sees " ' " and leaves "don ' t")."""
    for a, b in _CLEANUP:
        text = text.replace(a, b)
    return text


_CLEANUP = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


class BlipTokenizer:
    """Callable like a HF tokenizer, returning ``input_ids`` / ``attention_mask`` LongTensors."""

    pad_token_id = 0
    cls_token_id = 101
    sep_token_id = 102
    unk_token_id = 100

    def __init__(self, tokenizer: Tokenizer):
        tok = tokenizer
        if tok.token_to_id(DEC_TOKEN) is None or tok.token_to_id(ENC_TOKEN) is None:
            # BLIP's init_tokenizer: add_special_tokens({'bos_token': '[DEC]'}) then
            # additional_special_tokens ['[ENC]'] -> ids 30522, 30523 after the 30,522 BERT tokens.
            tok.add_special_tokens([AddedToken(DEC_TOKEN, special=True), AddedToken(ENC_TOKEN, special=True)])
        self._tok = tok
        self.bos_token_id = tok.token_to_id(DEC_TOKEN)
        self.enc_token_id = tok.token_to_id(ENC_TOKEN)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        for name, want in (("[PAD]", 0), ("[CLS]", 101), ("[SEP]", 102)):
            if tok.token_to_id(name) != want:
                raise TokenizerError(f"tokenizer maps {name} to {tok.token_to_id(name)}, BLIP needs {want}")
        tok.no_padding()
        tok.no_truncation()

    @property
    def backend(self) -> Tokenizer:
        return self._tok

    def __len__(self) -> int:
        return self.vocab_size

    def __call__(
        self,
        texts: str | list[str],
        max_length: int = 35,
        padding: str = "longest",
        truncation: bool = True,
        return_tensors: str | None = "pt",
    ) -> dict[str, torch.Tensor]:
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors must be 'pt', got {return_tensors!r}")
        if isinstance(texts, str):
            texts = [texts]
        encs = self._tok.encode_batch(list(texts))
        ids = [e.ids for e in encs]
        if truncation:
            # HF truncation keeps the final [SEP]: first max_length-1 tokens + [SEP].
            ids = [x if len(x) <= max_length else x[: max_length - 1] + [self.sep_token_id] for x in ids]
        width = max_length if padding == "max_length" else max((len(x) for x in ids), default=0)
        width = max(width, max((len(x) for x in ids), default=0))
        input_ids = torch.zeros(len(ids), width, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, : len(x)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return clean_up_tokenization(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def batch_decode(self, list_of_ids, skip_special_tokens: bool = True) -> list[str]:
        if isinstance(list_of_ids, torch.Tensor):
            list_of_ids = list_of_ids.tolist()
        return [self.decode(x, skip_special_tokens=skip_special_tokens) for x in list_of_ids]

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self._tok.id_to_token(i) for i in ids]

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json`` and ``vocab.txt`` (the 30,522 BERT tokens) into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(d / "tokenizer.json"))
        vocab = self._tok.get_vocab(with_added_tokens=False)
        inv = sorted(((i, t) for t, i in vocab.items() if i < BERT_VOCAB_SIZE))
        (d / "vocab.txt").write_text("".join(t + "\n" for _, t in inv), encoding="utf-8")
        return d


def _from_file(path: Path) -> BlipTokenizer:
    if path.name.endswith(".json"):
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise TokenizerError(f"{path}: not a tokenizers JSON file ({e})") from e
        return BlipTokenizer(tok)
    return BlipTokenizer(_build_from_vocab(path))


def load_tokenizer(path: str | Path | None = None) -> BlipTokenizer:
    """BLIP tokenizer from a checkpoint dir, a tokenizer.json / vocab.txt file, or the shipped vocab."""
    if path is None:
        return BlipTokenizer(_build_from_vocab(ASSET_VOCAB))
    p = Path(path)
    if p.is_dir():
        for name in ("tokenizer.json", "vocab.txt"):
            if (p / name).is_file():
                return _from_file(p / name)
        # A checkpoint dir without tokenizer files (e.g. an HF dir saved without processor): BLIP's vocab.
        return BlipTokenizer(_build_from_vocab(ASSET_VOCAB))
    if p.is_file():
        return _from_file(p)
    raise NotFoundError(f"tokenizer source not found: {p}")

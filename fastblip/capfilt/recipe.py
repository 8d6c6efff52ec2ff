"""The CapFilt recipe (``fastblip capfilt --recipe recipes/capfilt.yaml captioner=CKPT filter=CKPT ...``)."""

from __future__ import annotations

from dataclasses import dataclass

from fastblip.config import ConfigError

METHODS = ("nucleus", "beam")
DTYPES = ("auto", "bf16", "fp32")


@dataclass
class CapfiltRecipe:
    captioner: str = ""  # checkpoint of a captioner (or pretraining model): anything fastblip.load reads
    filter: str = ""  # checkpoint of a retrieval/ITM model (or pretraining model)
    input: str = ""  # web shards: a path, a brace pattern dir/web-{00000..00099}.tar, several joined by '::'
    output: str = ""  # output directory: one shard per input shard + manifest.jsonl + totals.json
    num_captions: int = 1  # K synthetic captions per image (the paper: 1; its future work: more)
    method: str = "nucleus"  # nucleus (the paper: more diverse, better bootstrapping) | beam
    top_p: float = 0.9
    top_k: int = 50  # HF generate's default, inherited by the official nucleus call
    repetition_penalty: float = 0.0  # 0 = BLIP's default for the method (1.1 nucleus, 1.0 beam)
    num_beams: int = 3  # beam method; at least num_captions
    max_length: int = 30  # tokens, prompt included (BLIP_Decoder.generate's default)
    min_length: int = 5
    prompt: str = ""  # empty = the captioner's own prompt ("a picture of ")
    threshold: float = 0.5  # keep a text when its softmax ITM match probability >= threshold (BLIP's rule)
    keep_web: bool = True  # score and keep web texts (False: synthetic captions only)
    batch_size: int = 64  # images per forward; results do not depend on it (counter-based seeds)
    seed: int = 0
    image_size: int = 384  # both models' input size (BLIP's captioner and filter are finetuned at 384)
    max_words: int = 30  # pre_caption on web texts
    text_max_length: int = 35  # ITM tokenisation, as the retrieval finetune
    num_workers: int = 4  # decode threads
    compile: bool = False  # torch.compile the two ViTs and the filter's text encoder
    dtype: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    device: str = "auto"  # auto = cuda:LOCAL_RANK when available, else cpu
    progress: bool = True  # rank 0: a bar on a terminal, otherwise one line per shard
    max_image_bytes: int = 64 << 20  # input limits (fastblip/data/decode.py): larger members are skipped unread
    max_text_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"recipe key 'method': {self.method!r} is not one of {', '.join(METHODS)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"recipe key 'dtype': {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.num_captions < 0 or self.batch_size < 1 or self.image_size < 1:
            raise ConfigError("recipe keys 'num_captions' >= 0, 'batch_size' >= 1 and 'image_size' >= 1 required")
        for k in ("num_beams", "max_length", "max_words", "text_max_length", "max_image_bytes", "max_text_bytes"):
            if getattr(self, k) < 1:
                raise ConfigError(f"recipe key '{k}' must be >= 1, got {getattr(self, k)}")
        if self.min_length < 0 or self.min_length > self.max_length or self.top_k < 0 or self.num_workers < 0:
            raise ConfigError("recipe keys 'min_length' in [0, max_length], 'top_k' >= 0 and 'num_workers' >= 0 "
                              f"required, got {self.min_length}, {self.top_k}, {self.num_workers}")
        if not 0.0 <= self.threshold <= 1.0 or not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"recipe keys 'threshold' in [0, 1] and 'top_p' in (0, 1] required, got "
                              f"{self.threshold}, {self.top_p}")
        if self.method == "beam" and self.num_captions > self.num_beams:
            raise ConfigError(f"recipe key 'num_captions' ({self.num_captions}) must be <= num_beams "
                              f"({self.num_beams}) for beam search")

    def check_paths(self) -> None:
        """The keys a run needs, checked before any work (one clear line)."""
        for key in ("captioner", "filter", "input", "output"):
            if not getattr(self, key):
                raise ConfigError(f"capfilt needs '{key}=...' (on the command line or in the recipe)")

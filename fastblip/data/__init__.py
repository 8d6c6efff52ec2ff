"""fastblip.data: readers, decoding (PIL | DALI), BLIP's transforms, tokenizer, synthetic data."""

from .batch import Batch, collate
from .check import check_sources
from .decode import DecodeError, decode_image
from .loader import Loader, build_loader
from .readers import SourceError, load_json_annotations, parse_sources
from .synth import make_synthetic
from .text import pre_caption, prompt_length, strip_prompt
from .tokenizer import BlipTokenizer, load_tokenizer
from .transforms import MEAN, STD, RandomAugment, eval_transform, train_transform

__all__ = [
    "Batch",
    "BlipTokenizer",
    "DecodeError",
    "Loader",
    "MEAN",
    "RandomAugment",
    "STD",
    "SourceError",
    "build_loader",
    "check_sources",
    "collate",
    "decode_image",
    "eval_transform",
    "load_json_annotations",
    "load_tokenizer",
    "make_synthetic",
    "parse_sources",
    "pre_caption",
    "prompt_length",
    "strip_prompt",
    "train_transform",
]

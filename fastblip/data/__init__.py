"""fastblip.data: readers, decoding (PIL | DALI), BLIP's transforms, tokenizer, synthetic data."""

from .batch import Batch
from .check import check_sources
from .decode import DecodeError, decode_image
from .formats import CAPTIONS, NLVRFormat, SampleFormat, VideoFormat, VQAFormat
from .loader import Loader, build_loader, open_loader
from .readers import SourceError, load_json_annotations, parse_sources
from .section import DataSection
from .synth import make_synthetic
from .text import pre_caption, pre_question, prompt_length, strip_prompt
from .tokenizer import BlipTokenizer, load_tokenizer
from .transforms import MEAN, STD, RandomAugment, eval_transform, train_transform

__all__ = [
    "Batch",
    "BlipTokenizer",
    "CAPTIONS",
    "DataSection",
    "DecodeError",
    "Loader",
    "NLVRFormat",
    "SampleFormat",
    "VQAFormat",
    "VideoFormat",
    "MEAN",
    "RandomAugment",
    "STD",
    "SourceError",
    "build_loader",
    "check_sources",
    "decode_image",
    "eval_transform",
    "load_json_annotations",
    "load_tokenizer",
    "make_synthetic",
    "open_loader",
    "parse_sources",
    "pre_caption",
    "pre_question",
    "prompt_length",
    "strip_prompt",
    "train_transform",
]

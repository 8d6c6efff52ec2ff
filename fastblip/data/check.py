"""``fastblip data check``: read every sample through the loader's own decode path and count outcomes."""

from __future__ import annotations

from .dataset import BlipStream, StreamConfig
from .decode import max_image_bytes as _default_image_bytes
from .decode import max_text_bytes as _default_text_bytes
from .readers import parse_sources, preflight
from .transforms import eval_transform


class _NoTokenizer:
    pass


def check_sources(sources, max_words: int = 50, image_size: int = 32, max_image_bytes: int | None = None,
                  max_text_bytes: int | None = None) -> dict:
    """{"ok": N, "skipped": {reason: n}, "converted": {mode: n}, "shards": n, "json_items": n}.

    Raises SourceError / NotFoundError when nothing in the source is readable. Memory stays bounded by the
    input limits (decode.py): an oversized member is counted as ``too_large`` without being read.
    """
    src = parse_sources(sources, flatten_json=True)
    preflight(src)
    cfg = StreamConfig(shards=src.shards, json_items=src.json_items, batch_size=1 << 30, train=False,
                       shuffle=False, drop_last=True, max_words=max_words,
                       max_image_bytes=max_image_bytes or _default_image_bytes(),
                       max_text_bytes=max_text_bytes or _default_text_bytes())  # fmt: skip
    stream = BlipStream(cfg, eval_transform(image_size), _NoTokenizer())
    total = {"ok": 0, "skipped": {}, "converted": {}}
    # batch_size is never reached and drop_last is set, so the worker only counts: no tokenisation.
    for batch, info in stream:
        assert batch is None
        c = info["counts"]
        total["ok"] += c["ok"]
        for k in ("skipped", "converted"):
            for r, n in c[k].items():
                total[k][r] = total[k].get(r, 0) + n
    total["shards"] = len(src.shards)
    total["json_items"] = len(src.json_items)
    return total

"""CapFilt (BLIP §3.3) at scale: caption web images, filter web and synthetic texts with ITM, write new shards.

Per input shard: read and decode (corrupt samples skipped and counted, fastblip.data), encode each image once
per model, sample K captions per image (each image's cross-attention K/V projected once and shared by its K
rows, KV-cached decoding), score the web text and every synthetic caption with the filter's ITM head (the
image's K/V again shared by all its texts), keep the texts with softmax match probability >= threshold.

Output, per input shard ``NAME.tar`` (written to a temporary name, then renamed; the manifest last = done):
- ``NAME.tar``: one webdataset sample per *kept* (image, text) pair, key ``{key}_web`` / ``{key}_syn{j}``:
  ``.jpg`` (the input bytes), ``.txt`` (the text), ``.json`` {caption, source, itm_score, image_id, key,
  noisy?}. ``fastblip pretrain`` reads it as is; the image id keeps an image's pairs together.
- ``NAME.scores.jsonl``: one line per image with *every* candidate text, its source, score and verdict.
- ``NAME.manifest.json``: counts (images, skipped by reason, kept/dropped per source, seconds), the ITM scores'
  sufficient statistics per source (count, sum, sum of squares, min, max, a 100-bin histogram on [0, 1]) and,
  where the input carries ``noisy`` labels (the synthetic data does), the filter's confusion counts on web texts.
At the end: ``manifest.jsonl`` (one line per shard, input order) and ``totals.json``: the counts, ITM score
statistics per source (mean, sd, min, max, p10/p50/p90 from the histogram: ±0.005) and, with labels, the filter's
precision and recall at removing noisy web texts (``filter_quality``); the CLI prints them.

The bootstrapped pretraining set (paper §3.3) = human-annotated pairs + these shards (filtered web + filtered
synthetic): list both under ``data.train`` of a pretraining recipe (see recipes/capfilt.yaml).

Determinism: batches never span shards, and every sampled token is drawn from a counter-based uniform whose
seed is a hash of (run seed, shard name, key, sample index), so a shard's output does not depend on the
batch size, on which rank took it, or on a restart. Ranks (torchrun) take shards i ≡ rank (mod world).

Resume by skip, keyed by the settings (issue 15): ``capfilt.json`` in the output holds the fingerprint of every
setting that changes a shard's output (``SETTINGS``); each shard manifest (the done marker) carries it too. A
rerun with the same settings skips shards whose manifest has it; a rerun with other settings is refused in one
line naming the first difference (``--overwrite`` redoes every shard instead). A shard that is missing or
unreadable as a whole gets no output and no done marker: it is listed in ``missing_shards`` and processed by
the rerun that finds it (a truncated shard is processed as far as it reads, its cut counted). An output
directory is owned by one run at a time (``fastblip/train/rundir.py``'s lock); a killed run's temp files are
removed by the next start.

Legend: B images in a batch, K captions per image, R = B·(1+K) texts scored, N image tokens.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastblip.capfilt.recipe import CapfiltRecipe
from fastblip.errors import CheckpointError, ConfigError, InputError
from fastblip.train import rundir

log = logging.getLogger("fastblip.capfilt")
CRASH_ENV = "FASTBLIP_CAPFILT_CRASH_AFTER"  # "RANK:N": that rank dies after N shards (resume tests)
SETTINGS_NAME = "capfilt.json"
# recipe keys that change what a shard's output holds (not batch_size, num_workers, compile, device, progress:
# the output does not depend on them, see Determinism); dtype enters resolved (auto -> bf16 on CUDA, fp32 on CPU)
SETTINGS = ("captioner", "filter", "num_captions", "method", "top_p", "top_k", "repetition_penalty", "num_beams",
            "max_length", "min_length", "prompt", "threshold", "keep_web", "seed", "image_size", "max_words",
            "text_max_length", "max_image_bytes", "max_text_bytes")
WHOLE_SHARD_PROBLEMS = ("missing_shard", "unreadable_shard")  # nothing of the shard was read
STALE_GLOBS = ("*.tmp[0-9]*", ".*.tmp-*")  # _atomic_write's and rundir.atomic_write_text's temp names


# ----------------------------------------------------------------------------- seeds and files


def sample_seed(run_seed: int, shard: str, key: str, index: int) -> int:
    """Non-negative int64 seed of caption ``index`` of image ``key`` in ``shard`` (blake2b, not Python's
    salted ``hash``, so every process and rerun agrees)."""
    h = hashlib.blake2b(f"{run_seed}\x1f{shard}\x1f{key}\x1f{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFF_FFFF_FFFF_FFFF


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644  # mtime 0: byte-identical reruns
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def shard_name(url: str) -> str:
    base = url.rstrip("/").rpartition("/")[2]
    return base[:-4] if base.endswith(".tar") else base


SCORE_BINS = 100  # ITM match probabilities in [0, 1] binned 0.01 wide: the quantiles in totals.json to +-0.005


def score_stats() -> dict:
    """Sufficient statistics of a set of ITM scores (mergeable across shards)."""
    return {"n": 0, "sum": 0.0, "sumsq": 0.0, "min": None, "max": None, "hist": [0] * SCORE_BINS}


def add_score(st: dict, s: float) -> None:
    st["n"] += 1
    st["sum"] += s
    st["sumsq"] += s * s
    st["min"] = s if st["min"] is None else min(st["min"], s)
    st["max"] = s if st["max"] is None else max(st["max"], s)
    st["hist"][min(SCORE_BINS - 1, max(0, int(s * SCORE_BINS)))] += 1


def merge_stats(a: dict, b: dict) -> dict:
    lo = [v for v in (a["min"], b["min"]) if v is not None]
    hi = [v for v in (a["max"], b["max"]) if v is not None]
    return {"n": a["n"] + b["n"], "sum": a["sum"] + b["sum"], "sumsq": a["sumsq"] + b["sumsq"],
            "min": min(lo) if lo else None, "max": max(hi) if hi else None,
            "hist": [x + y for x, y in zip(a["hist"], b["hist"])]}


def _quantile(hist: list[int], n: int, q: float, lo: float, hi: float) -> float:
    """The q-quantile from the histogram, linear inside its bin, clamped to the observed [lo, hi]."""
    target, cum = q * n, 0
    for i, c in enumerate(hist):
        if c and cum + c >= target:
            return min(hi, max(lo, (i + (target - cum) / c) / len(hist)))
        cum += c
    return hi


def summarize_scores(st: dict) -> dict:
    """{n, mean, sd, min, max, p10, p50, p90} of ``score_stats``; the figures are None without scores."""
    n = st["n"]
    if not n:
        return {"n": 0, "mean": None, "sd": None, "min": None, "max": None, "p10": None, "p50": None, "p90": None}
    mean = st["sum"] / n
    sd = max(0.0, st["sumsq"] / n - mean * mean) ** 0.5
    qs = {f"p{int(q * 100)}": round(_quantile(st["hist"], n, q, st["min"], st["max"]), 4) for q in (0.1, 0.5, 0.9)}
    return {"n": n, "mean": round(mean, 4), "sd": round(sd, 4), "min": round(st["min"], 4),
            "max": round(st["max"], 4), **qs}


def filter_quality(c: dict) -> dict | None:
    """The filter at *removing noisy web texts*, from confusion counts over web texts with a ``noisy`` label
    (tp: noisy and dropped, fp: clean and dropped, fn: noisy and kept, tn: clean and kept). None without labels.
    precision = tp / dropped; recall = tp / noisy; dropping at random has precision = the noise rate."""
    n = c["tp"] + c["fp"] + c["fn"] + c["tn"]
    if not n:
        return None
    ratio = lambda a, b: round(a / b, 4) if b else None  # noqa: E731
    return {"labelled_web_texts": n, "noise_rate": ratio(c["tp"] + c["fn"], n),
            "precision": ratio(c["tp"], c["tp"] + c["fp"]), "recall": ratio(c["tp"], c["tp"] + c["fn"]),
            "kept_clean_fraction": ratio(c["tn"], c["tn"] + c["fn"]), **{k: c[k] for k in ("tp", "fp", "fn", "tn")}}


def expand_input(spec: str) -> list[str]:
    from fastblip.data.readers import parse_sources

    try:
        urls = parse_sources(spec).shards
    except ValueError as e:  # webdataset's brace expansion on a malformed pattern
        raise ConfigError(f"capfilt input {spec!r}: {e}") from None
    if not urls:
        raise ConfigError(f"capfilt input {spec!r} names no tar shards")
    names = [shard_name(u) for u in urls]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"capfilt input: shard names must be unique (outputs are named after them): "
                          f"{sorted(dup)[:3]}")
    return urls


def check_inputs(urls: list[str]) -> dict[str, str]:
    """Before any model is loaded: the local input shards that are missing or unreadable ({url: reason});
    all of them (and none remote) is an error (a brace pattern that matches nothing, a wrong directory)."""
    from fastblip.data.readers import shard_problem

    problems = {u: r for u in urls if (r := shard_problem(u))}
    if problems and len(problems) == len(urls):
        shown = ", ".join(f"{u} ({r})" for u, r in list(problems.items())[:3])
        raise InputError(f"capfilt input: none of the {len(urls)} input shards can be read: {shown}"
                         f"{', ...' if len(urls) > 3 else ''}")
    if problems:
        log.warning("capfilt: %d of %d input shards missing or unreadable (not marked done; a rerun processes them "
                    "once they are there): %s", len(problems), len(urls), ", ".join(list(problems)[:5]))
    return problems


def settings(recipe: CapfiltRecipe, device: torch.device | None = None) -> dict:
    """The settings that produce a shard's output (``SETTINGS``), checkpoint paths made absolute."""
    out = {k: getattr(recipe, k) for k in SETTINGS}
    for k in ("captioner", "filter"):
        if out[k] and "://" not in out[k] and os.path.exists(out[k]):
            out[k] = os.path.abspath(out[k])
    dev = torch.device(device) if device is not None else None
    out["dtype"] = "bf16" if recipe.dtype == "bf16" or (recipe.dtype == "auto" and dev is not None and
                                                        dev.type == "cuda") else "fp32"
    return out


# ----------------------------------------------------------------------------- reading


@dataclass
class Item:
    key: str
    image_bytes: bytes
    pixels: torch.Tensor  # (3, S, S)
    web_text: str | None  # pre_caption'd web text, None when the sample has none
    meta: dict


@dataclass
class ShardInput:
    url: str
    items: list[Item] = field(default_factory=list)
    skipped: dict = field(default_factory=dict)
    missing_text: int = 0


def read_shard(url: str, transform, max_words: int, pool: ThreadPoolExecutor, max_image_bytes: int | None = None,
               max_text_bytes: int | None = None) -> ShardInput:
    """Raw samples through fastblip.data's reader, decoded on ``pool``; bad samples counted by reason; members
    over the size limits are skipped unread (``too_large``)."""
    from fastblip.data.decode import DecodeError, decode_image
    from fastblip.data.readers import iter_tar, split_sample
    from fastblip.data.text import clean_caption_bytes, pre_caption

    out = ShardInput(url)
    raws = list(iter_tar(url, out.skipped, max_image_bytes_=max_image_bytes, max_text_bytes_=max_text_bytes))

    def one(raw: dict):
        img_b, _, cap_b, meta, problem = split_sample(raw)
        if problem is not None:
            return raw["__key__"], problem
        try:
            img, _ = decode_image(img_b)
        except DecodeError as e:
            return raw["__key__"], e.reason
        text, _ = clean_caption_bytes(cap_b)
        text = pre_caption(text, max_words) if text is not None else None
        return Item(raw["__key__"], img_b, transform(img), text or None, meta), None

    for res, problem in pool.map(one, raws):
        if problem is not None:
            out.skipped[problem] = out.skipped.get(problem, 0) + 1
            log.warning("capfilt: skipped %s in %s: %s", res, url, problem)
            continue
        out.missing_text += res.web_text is None
        out.items.append(res)
    return out


# ----------------------------------------------------------------------------- the two models


class CapFilt:
    """Captioner + filter on one device; ``caption_and_score`` is the per-batch work."""

    def __init__(self, captioner, filter_model, recipe: CapfiltRecipe, device: torch.device):
        for m, need, what in ((captioner, "text_decoder", "captioner"), (filter_model, "itm_head", "filter")):
            if not hasattr(m, need):
                raise CheckpointError(f"the {what} checkpoint ({type(m).__name__}) has no '{need}': use a "
                                 f"{'caption' if what == 'captioner' else 'retrieval/ITM'} or pretraining model")
        self.cap, self.flt, self.r, self.device = captioner.eval(), filter_model.eval(), recipe, device
        self.tok = captioner.tokenizer
        self.prompt = recipe.prompt or captioner.cfg.prompt
        # every implementation choice of the run, once (fastblip.backends; the CLI prints backends.line())
        import dataclasses

        from fastblip.backends import resolve

        bk = resolve(device, attention=captioner.cfg.attention_backend, ops="auto", compile=recipe.compile,
                     amp=recipe.dtype, max_length=recipe.max_length)
        self.backends = dataclasses.replace(bk, compile="models" if bk.compile != "off" else "off", optimizer="none",
                                            data="pil", padding="max_length")
        for m in {id(captioner): captioner, id(filter_model): filter_model}.values():
            m.set_backends(attention=bk.attention, ops=dict(bk.ops))
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bk.amp == "bf16")
        if self.backends.compile == "models":
            # ViTs and the filter's text encoder have static shapes (fixed image size, max_length texts)
            for m in {id(captioner): captioner, id(filter_model): filter_model}.values():
                m.visual_encoder = torch.compile(m.visual_encoder)
            filter_model.text_encoder = torch.compile(filter_model.text_encoder, dynamic=True)

    @torch.no_grad()
    def caption_and_score(self, shard: str, items: list[Item]) -> list[dict]:
        """Per image: {"key", "texts": [(source, text, score)]}: web text first (when any), then K captions."""
        from fastblip.data.text import pre_caption
        from fastblip.models.generation import generate_ids

        r, K, B = self.r, self.r.num_captions, len(items)
        pix = torch.stack([it.pixels for it in items]).to(self.device, non_blocking=True)
        with self.autocast:
            emb_c = self.cap.encode_image(pix)  # (B, N, C) once for the captioner ...
            emb_f = emb_c if self.flt is self.cap else self.flt.encode_image(pix)  # ... and once for the filter
            caps: list[list[str]] = [[] for _ in items]
            if K:
                seeds = torch.tensor([sample_seed(r.seed, shard, it.key, j) for it in items for j in range(K)],
                                     dtype=torch.long)
                ids = generate_ids(self.cap, pix, method=r.method, num_return_sequences=K, prompt=self.prompt,
                                   max_length=r.max_length, min_length=r.min_length, num_beams=max(r.num_beams, K),
                                   top_p=r.top_p, top_k=r.top_k, seeds=seeds if r.method == "nucleus" else None,
                                   repetition_penalty=r.repetition_penalty or None, image_embeds=emb_c)
                texts = self.tok.batch_decode(ids.tolist(), skip_special_tokens=True)
                for b in range(B):
                    caps[b] = [pre_caption(t[len(self.prompt):] if t.startswith(self.prompt) else t, r.max_words)
                               for t in texts[b * K:(b + 1) * K]]
            cand, owner = [], []  # texts to score and their image (row of emb_f)
            for b, it in enumerate(items):
                if r.keep_web and it.web_text:
                    cand.append(("web", it.web_text))
                    owner.append(b)
                for j, c in enumerate(caps[b]):
                    cand.append((f"syn{j}", c))
                    owner.append(b)
            scores = torch.empty(0)
            if cand:
                enc = self.tok([c[1] for c in cand], max_length=r.text_max_length, padding="max_length")
                kv_index = torch.tensor(owner, device=self.device)
                h = self.flt.itm_hidden(emb_f, enc["input_ids"].to(self.device),
                                        enc["attention_mask"].to(self.device), kv_index=kv_index)
                scores = self.flt.itm_head(h).float().softmax(dim=-1)[:, 1].cpu()  # sync: results to host
        out = [{"key": it.key, "texts": []} for it in items]
        for (src, text), b, s in zip(cand, owner, scores.tolist()):
            out[b]["texts"].append((src, text, s))
        return out


# ----------------------------------------------------------------------------- one shard


def _image_id(it: Item) -> int:
    from fastblip.data.dataset import key_image_id

    iid = it.meta.get("image_id")
    return iid if isinstance(iid, int) and not isinstance(iid, bool) else key_image_id(it.key)


def process_shard(engine: CapFilt, shard_in: ShardInput, out_dir: Path, crash_now: bool = False,
                  fingerprint: str | None = None) -> dict:
    """Caption, score and write one shard; returns its manifest line. A shard that could not be read at all
    writes nothing (no done marker): its manifest line says ``missing`` and a rerun processes it."""
    r = engine.r
    name = shard_name(shard_in.url)
    whole = [p for p in WHOLE_SHARD_PROBLEMS if shard_in.skipped.get(p)]
    if whole and not shard_in.items:
        log.warning("capfilt: %s is %s: nothing written, not marked done", shard_in.url, whole[0])
        return {"shard": name, "input": shard_in.url, "missing": whole[0], "images": 0}
    t0 = time.perf_counter()
    members: list[tuple[str, bytes]] = []
    score_lines: list[str] = []
    counts = {"web": {"kept": 0, "dropped": 0}, "synthetic": {"kept": 0, "dropped": 0}}
    scores = {"web": score_stats(), "synthetic": score_stats()}
    confusion = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}  # web texts with a noisy label; positive = dropped
    items = shard_in.items
    for a in range(0, len(items), r.batch_size):
        batch = items[a:a + r.batch_size]
        for it, res in zip(batch, engine.caption_and_score(name, batch)):
            iid = _image_id(it)
            line = {"key": it.key, "image_id": iid, "noisy": it.meta.get("noisy"), "texts": []}
            for src, text, s in res["texts"]:
                keep = s >= r.threshold and bool(text)
                kind = "web" if src == "web" else "synthetic"
                counts[kind]["kept" if keep else "dropped"] += 1
                add_score(scores[kind], s)
                if kind == "web" and it.meta.get("noisy") is not None:
                    noisy = bool(it.meta["noisy"])
                    confusion[("f" if noisy == keep else "t") + ("n" if keep else "p")] += 1
                line["texts"].append({"source": src, "text": text, "itm_score": s, "kept": keep})
                if keep:
                    k = f"{it.key}_{src}"
                    meta = {"caption": text, "source": "web" if src == "web" else "synthetic", "itm_score": s,
                            "image_id": iid, "key": it.key}
                    if src == "web" and it.meta.get("noisy") is not None:
                        meta["noisy"] = it.meta["noisy"]
                    members += [(k + ".jpg", it.image_bytes), (k + ".txt", text.encode()),
                                (k + ".json", json.dumps(meta).encode())]
            score_lines.append(json.dumps(line))
    secs = time.perf_counter() - t0
    manifest = {"shard": name, "input": shard_in.url, "images": len(items), "pairs": len(members) // 3,
                "skipped": dict(sorted(shard_in.skipped.items())), "web_missing": shard_in.missing_text,
                **counts, "itm_scores": scores, "noise_labels": confusion, "fingerprint": fingerprint}
    tar_path = out_dir / f"{name}.tar"
    if crash_now:  # test hook: die with the shard half-written (a temp file left behind, nothing renamed)
        (out_dir / f"{name}.tar.tmp{os.getpid()}").write_bytes(_tar_bytes(members)[:1024])
        os._exit(17)
    _atomic_write(tar_path, _tar_bytes(members))
    _atomic_write(out_dir / f"{name}.scores.jsonl", "".join(s + "\n" for s in score_lines).encode())
    _atomic_write(out_dir / f"{name}.manifest.json", json.dumps(manifest, sort_keys=True).encode())  # done marker
    manifest["seconds"] = secs
    return manifest


def is_done(out_dir: Path, url: str, fingerprint: str | None = None) -> bool:
    """The shard's done marker exists with its outputs and (when given) was written under ``fingerprint``."""
    name = shard_name(url)
    man = out_dir / f"{name}.manifest.json"
    if not (man.is_file() and (out_dir / f"{name}.tar").is_file() and (out_dir / f"{name}.scores.jsonl").is_file()):
        return False
    if fingerprint is None:
        return True
    try:
        return json.loads(man.read_text()).get("fingerprint") == fingerprint
    except (OSError, ValueError):
        return False


def _open_output(out_dir: Path, urls: list[str], current: dict, overwrite: bool) -> rundir.RunLock:
    """Rank 0: lock the output, remove a killed run's temp files, check or write the settings (``capfilt.json``);
    a directory holding another settings' results refuses (or, ``overwrite``, has them removed)."""
    lock = rundir.acquire_lock(out_dir, "capfilt", "capfilt output")
    try:
        rundir.remove_stale(out_dir, STALE_GLOBS)
        path = out_dir / SETTINGS_NAME
        fp = rundir.fingerprint_hash(current)
        try:
            saved = json.loads(path.read_text()) if path.is_file() else None
        except (OSError, ValueError):
            saved = {}
        ours = [p for u in urls for p in out_dir.glob(f"{shard_name(u)}.*")] + \
            [out_dir / n for n in ("manifest.jsonl", "totals.json") if (out_dir / n).exists()]
        legacy = saved is None and any(p.name.endswith(".manifest.json") for p in ours)
        differs = saved is not None and (not isinstance(saved, dict) or saved.get("fingerprint") != fp)
        if (differs or legacy) and not overwrite:
            if legacy:
                why = f"results of unknown settings (no {SETTINGS_NAME}: written by an older fastblip)"
            else:
                diff = rundir.first_diff((saved or {}).get("settings", {}) if isinstance(saved, dict) else {},
                                         current, SETTINGS_NAME)
                why = f"results of other settings ({diff or 'fingerprint differs'})"
            raise rundir.RunMismatchError(f"capfilt output {out_dir} holds {why}: use another output=..., or "
                                          "--overwrite to redo every shard with these settings")
        if overwrite and (differs or legacy or saved is not None):
            for p in ours + [path]:
                p.unlink(missing_ok=True)
            if ours:
                log.warning("capfilt --overwrite: removed %d output files of the previous run in %s", len(ours),
                            out_dir)
            saved = None
        if saved is None:
            rundir.atomic_write_text(path, json.dumps({"fingerprint": fp, "settings": current}, indent=1,
                                                      sort_keys=True))
    except BaseException:
        lock.release()
        raise
    return lock


def open_output(recipe: CapfiltRecipe, urls: list[str], *, rank: int = 0, world_size: int = 1,
                device: torch.device | str | None = None, overwrite: bool = False) -> rundir.RunLock | None:
    """Own ``recipe.output`` for this run (rank 0 holds the lock; every rank gets rank 0's error, if any)."""
    out_dir = Path(recipe.output)
    current = settings(recipe, torch.device(device) if device not in (None, "auto") else None)
    return rundir.on_rank0(lambda: _open_output(out_dir, urls, current, overwrite))[0]


# ----------------------------------------------------------------------------- the run


def _crash_after(rank: int) -> int | None:
    spec = os.environ.get(CRASH_ENV, "")
    if not spec:
        return None
    r, _, n = spec.partition(":")
    return int(n) if int(r) == rank else None


def collect(out_dir: Path, urls: list[str]) -> dict:
    """manifest.jsonl (input order) + totals.json from the per-shard manifests; returns the totals: counts,
    ``itm_scores`` per source (``summarize_scores``) and ``filter`` (``filter_quality``: None without labels)."""
    lines, totals = [], {"shards": 0, "images": 0, "pairs": 0, "skipped": {}, "web_missing": 0,
                         "web": {"kept": 0, "dropped": 0}, "synthetic": {"kept": 0, "dropped": 0},
                         "missing_shards": []}
    stats = {"web": score_stats(), "synthetic": score_stats()}
    confusion = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    without_stats = 0  # shards written by a fastblip before the statistics
    for u in urls:
        p = out_dir / f"{shard_name(u)}.manifest.json"
        if not is_done(out_dir, u):  # no done marker, or half its outputs: not done
            totals["missing_shards"].append(shard_name(u))
            continue
        m = json.loads(p.read_text())
        lines.append(json.dumps(m, sort_keys=True))
        totals["shards"] += 1
        for k in ("images", "pairs", "web_missing"):
            totals[k] += m[k]
        for src in ("web", "synthetic"):
            for k in ("kept", "dropped"):
                totals[src][k] += m[src][k]
        for k, v in m["skipped"].items():
            totals["skipped"][k] = totals["skipped"].get(k, 0) + v
        if "itm_scores" not in m:
            without_stats += 1
            continue
        for src in stats:
            stats[src] = merge_stats(stats[src], m["itm_scores"][src])
        for k in confusion:
            confusion[k] += m["noise_labels"][k]
    totals["itm_scores"] = {src: summarize_scores(st) for src, st in stats.items()}
    totals["filter"] = filter_quality(confusion)
    if without_stats:
        totals["shards_without_statistics"] = without_stats
    _atomic_write(out_dir / "manifest.jsonl", "".join(s + "\n" for s in lines).encode())
    _atomic_write(out_dir / "totals.json", json.dumps(totals, indent=1, sort_keys=True).encode())
    return totals


def _pct(a: int, b: int) -> str:
    return f"{100.0 * a / b:.1f}%" if b else "n/a"


def format_totals(totals: dict, out_dir: str | Path) -> str:
    """The totals as a person reads them (``fastblip capfilt`` without ``--json``)."""
    t = totals
    lines = [f"capfilt: {t['images']} images in {t['shards']} shards -> {t['pairs']} kept (image, text) pairs "
             f"in {out_dir}"]
    for src in ("web", "synthetic"):
        c = t[src]
        n = c["kept"] + c["dropped"]
        sc = (t.get("itm_scores") or {}).get(src) or {}
        score = (f"; ITM match probability mean {sc['mean']:.3f}, sd {sc['sd']:.3f}, p10/p50/p90 {sc['p10']:.3f}/"
                 f"{sc['p50']:.3f}/{sc['p90']:.3f}, min {sc['min']:.3f}, max {sc['max']:.3f}") if sc.get("n") else ""
        lines.append(f"  {src} texts: kept {c['kept']} of {n} ({_pct(c['kept'], n)}){score}")
    f = t.get("filter")
    if f:
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"  filter against the noise labels ({f['labelled_web_texts']} web texts, {fmt(f['noise_rate'])} "
                     f"noisy): precision {fmt(f['precision'])}, recall {fmt(f['recall'])} at dropping noisy texts "
                     f"(dropping at random: precision = the noise rate)")
    else:
        lines.append("  filter precision/recall: the input has no noise labels ('noisy' in the samples' .json)")
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(t["skipped"].items())) or "none"
    lines.append(f"  skipped samples: {skipped}; images without a web text: {t['web_missing']}")
    if t.get("shards_without_statistics"):
        lines.append(f"  ({t['shards_without_statistics']} shards were written by an older fastblip: no score "
                     "statistics or labels counted for them)")
    if t["missing_shards"]:
        lines.append(f"  missing or unreadable input shards: {', '.join(t['missing_shards'][:5])}"
                     f"{' ...' if len(t['missing_shards']) > 5 else ''}")
    lines.append(f"  wrote {Path(out_dir) / 'totals.json'} and {Path(out_dir) / 'manifest.jsonl'}")
    return "\n".join(lines)


def run_capfilt(recipe: CapfiltRecipe, *, captioner=None, filter_model=None, rank: int = 0, world_size: int = 1,
                device: torch.device | str | None = None, overwrite: bool = False, owned: bool = False) -> dict:
    """Process this rank's unfinished shards. Models are loaded from the recipe's paths unless given.
    ``owned``: the caller already holds the output (``open_output``, as the CLI does); else this call takes it
    and lets go at the end. Returns this rank's {"shards", "images", "seconds", "images_per_sec",
    "skipped_done", "missing"}."""
    from fastblip.config import check_device

    urls = expand_input(recipe.input)
    if device is None or device == "auto":
        device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    check_device(device)
    device = torch.device(device)
    if not owned:  # the owner (the CLI) checked before taking the output
        check_inputs(urls)
    lock = None if owned else open_output(recipe, urls, rank=rank, world_size=world_size, device=device,
                                          overwrite=overwrite)
    try:
        return _run(recipe, urls, captioner, filter_model, rank, world_size, device)
    finally:
        if lock is not None:
            lock.release()


def _run(recipe: CapfiltRecipe, urls: list[str], captioner, filter_model, rank: int, world_size: int,
         device: torch.device) -> dict:
    from fastblip.data.transforms import eval_transform

    out_dir = Path(recipe.output)
    fp = rundir.fingerprint_hash(settings(recipe, device))
    if captioner is None or filter_model is None:
        import fastblip

        recipe.check_paths()
        captioner = captioner or fastblip.load(recipe.captioner, image_size=recipe.image_size, device=device)
        filter_model = filter_model or (captioner if recipe.filter == recipe.captioner else
                                        fastblip.load(recipe.filter, image_size=recipe.image_size, device=device))
    engine = CapFilt(captioner, filter_model, recipe, device)
    mine = [u for i, u in enumerate(urls) if i % world_size == rank]
    todo = [u for u in mine if not is_done(out_dir, u, fp)]
    crash_after = _crash_after(rank)
    from fastblip.train.progress import RUN_LOG, Progress, want_bar

    if rank == 0:
        logging.getLogger(RUN_LOG).info("capfilt: %s", engine.backends.line())
        logging.getLogger(RUN_LOG).info("capfilt: %d input shards on %d rank(s); rank 0: %d already done, %d to do",
                                        len(urls), world_size, len(mine) - len(todo), len(todo))
    # rank 0: a bar on a terminal (recipe key progress), else a line per shard, at most one per 10 s
    bar = Progress("capfilt", len(todo), unit="shard", bar=want_bar(recipe.progress)) if rank == 0 else None
    seen = {"web": [0, 0], "synthetic": [0, 0]}  # this run's [kept, scored] texts: what the bar shows
    tf = eval_transform(recipe.image_size)
    lim = (recipe.max_image_bytes, recipe.max_text_bytes)
    n_img, n_done, t0, missing = 0, 0, time.perf_counter(), []
    try:
        with ThreadPoolExecutor(max(1, recipe.num_workers)) as pool, ThreadPoolExecutor(1) as prefetch:
            nxt = prefetch.submit(read_shard, todo[0], tf, recipe.max_words, pool, *lim) if todo else None
            for i, _url in enumerate(todo):
                shard_in = nxt.result()
                # decode the next shard while this one runs on the accelerator
                nxt = prefetch.submit(read_shard, todo[i + 1], tf, recipe.max_words, pool, *lim) \
                    if i + 1 < len(todo) else None
                crash_now = crash_after is not None and n_done >= crash_after
                m = process_shard(engine, shard_in, out_dir, crash_now=crash_now, fingerprint=fp)
                if "missing" in m:
                    missing.append(m["shard"])
                    if bar is not None:
                        bar.update(1)
                    continue
                n_img += m["images"]
                n_done += 1
                for src, c in seen.items():
                    c[0] += m[src]["kept"]
                    c[1] += m[src]["kept"] + m[src]["dropped"]
                if bar is not None:
                    bar.update(1)
                    ips = n_img / max(time.perf_counter() - t0, 1e-9)
                    kept = {src: f"{k}/{n}" for src, (k, n) in seen.items()}
                    bar.show([f"{ips:.1f} img/s", f"kept web {kept['web']} ({_pct(*seen['web'])}), synthetic "
                              f"{kept['synthetic']} ({_pct(*seen['synthetic'])})"],
                             {"img_s": f"{ips:.1f}", "kept_web": kept["web"], "kept_syn": kept["synthetic"]})
    finally:
        if bar is not None:
            bar.close()
    secs = time.perf_counter() - t0
    return {"shards": n_done, "images": n_img, "seconds": secs, "images_per_sec": n_img / secs if secs else 0.0,
            "skipped_done": len(mine) - len(todo), "missing": missing}

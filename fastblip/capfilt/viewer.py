"""`fastblip capfilt view OUTPUT_DIR`: a static HTML report of a CapFilt output that opens from a file:// URL.

No server, no CDN, no external fonts or scripts: every page carries its own CSS and JS inline and its data in a
``<script type="application/json">`` block (Chromium's file:// pages may not fetch JSON), so the report can be
copied anywhere or zipped. Layout of the viewer directory (default ``OUTPUT_DIR/view``)::

    index.html            the summary first (counts, threshold, the filter's precision/recall against the noise
                          labels, ITM score histograms per source as inline SVG), then the shard list
    shards-0002.html ...  more of the shard list, 200 shards a page
    pages.js              the cross-page index (a plain script, the only file a page loads besides thumbnails)
    s/<shard>/index.html  the shard's pages with their per-page counts
    s/<shard>/p00001.html at most 200 images (and at most ~0.85 MB of data) per page
    s/<shard>/t/<key>.jpg thumbnails, longest side 128 px (``--no-thumbnails``: none)

Filtering and sorting (kept/dropped, web/synthetic, noise label, score range; sort by web or synthetic score)
run on the open page's rows, exactly. Across pages the filter is answered by a precomputed index instead of a
server: ``pages.js`` holds, per page, a bitmask over (noise label x source x verdict x 20 score bins of 0.05)
of the texts on it. A page shows how many pages *may* hold matches and links to the previous/next one: a
superset, exact up to the score bins at the range's two ends, and a "next match" jump that lands on a page
without an exact match moves on by itself. The score range is half-open, lo <= score < hi (hi = 1 includes 1),
like the threshold rule (kept: score >= threshold). The filter state lives in the URL's hash
and travels with every page link, so it survives paging.

An image's row is shown when its noise label is selected and at least one of its texts matches source,
verdict and score range; its other texts are dimmed. Captions are untrusted web text: pages insert them with
``textContent`` only, and ``<`` inside the JSON blocks is written as ``\\u003c``.

The threshold is not stored in CapFilt's output: ``--threshold`` states it; otherwise the summary shows the
interval the verdicts allow (every kept score >= every dropped one) and the recipe default 0.5 when it lies in
it. Precision/recall are those of the filter at *removing noisy web captions* (positive = noisy, predicted
positive = dropped) over the web texts whose image carries a ``noisy`` label (``fastblip data synth`` writes it
into each sample's ``.json``; CapFilt copies it into ``NAME.scores.jsonl``).

Cost: one pass over ``NAME.scores.jsonl``, shards spread over ``workers`` processes; 1M images without
thumbnails build in ~6 s on 2 idle cores, ~13 s in one process (measured 2026-11-28 on this project's 2-core
machine; tests/test_capfilt_viewer.py asserts the issue's bound, < 60 s).
"""

from __future__ import annotations

import argparse
import hashlib
import html
import io
import json
import math
import os
import re
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import TYPE_CHECKING

from fastblip.errors import FastblipError

if TYPE_CHECKING:
    import numpy as np

ROWS_PER_PAGE = 200  # images per page: 200 rows of DOM build in a few ms
PAGE_DATA_BYTES = 850_000  # a page's JSON budget: with the ~20 KB template every page stays under 1 MB
PAGE_LIMIT_BYTES = 1_000_000
SERIAL_BYTES = 16 << 20  # smaller outputs build in one process (~2 s): starting workers would cost ~1 s
SHARDS_PER_LIST = 200  # shard-list rows per summary page
BINS = 20  # score bins of the cross-page index (0.05 wide); 12 categories x 20 bins = 240 bits per page
HIST_BINS = 50  # summary histograms: bins of 0.02
LABELS = ("clean", "noisy", "unlabelled")  # the image's noise label: 0, 1, 2 in pages and masks
DEFAULT_THRESHOLD = 0.5  # CapfiltRecipe.threshold's default (BLIP's rule)
MARKER = ".fastblip-capfilt-view"  # marks a directory this module wrote, so a rebuild may clear it


class ViewerError(FastblipError, ValueError):
    """A viewer input or option that cannot be used (printed as one line by the CLI)."""


class ViewerNotFoundError(FastblipError, FileNotFoundError):
    """The CapFilt output directory, or any output in it, is missing."""


_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# ASCII-only JSON (non-ASCII as \uXXXX): a row's length in characters is its length in bytes, so the 1 MB
# page budget is counted exactly
_ENC = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=False)


def _safe_name(s: str) -> str:
    """A file name for a shard or key: itself when plain, else a hash (keys may hold '/', '..', spaces)."""
    if _SAFE.fullmatch(s):
        return s
    return "h" + hashlib.blake2b(s.encode(), digest_size=10).hexdigest()


def _json_block(obj) -> str:
    return _ENC.encode(obj).replace("<", "\\u003c")


# ----------------------------------------------------------------------------- reading the output


def list_shards(out_dir: Path) -> list[dict]:
    """Finished shards' manifests in input order (``manifest.jsonl``), then any other finished shard by name."""
    mans: list[dict] = []
    seen: set[str] = set()
    mj = out_dir / "manifest.jsonl"
    if mj.is_file():
        for line in mj.read_text().splitlines():
            if line.strip():
                m = json.loads(line)
                mans.append(m)
                seen.add(m["shard"])
    for p in sorted(out_dir.glob("*.manifest.json")):
        name = p.name[: -len(".manifest.json")]
        if name not in seen:
            mans.append(json.loads(p.read_text()))
            seen.add(name)
    mans = [m for m in mans if (out_dir / f"{m['shard']}.scores.jsonl").is_file()]
    if not mans:
        raise ViewerNotFoundError(f"{out_dir}: no CapFilt output here (no NAME.manifest.json with its NAME.scores.jsonl)")
    return mans


def _thumbnails(out_dir: Path, man: dict, tdir: Path, size: int) -> dict[str, str]:
    """key -> thumbnail file name, from the input shard (every image) or else the output tar (kept ones)."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from fastblip.data.readers import IMAGE_EXTS, iter_tar

    tdir.mkdir(parents=True, exist_ok=True)
    done: dict[str, str] = {}

    def one(item: tuple[str, bytes]) -> tuple[str, str | None]:
        key, data = item
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.draft("RGB", (2 * size, 2 * size))  # JPEG: decode at 1/2..1/8 scale, ~4x faster on 384 px
                im = im.convert("RGB")
                im.thumbnail((size, size))
                name = _safe_name(key) + ".jpg"
                im.save(tdir / name, format="JPEG", quality=82)
                return key, name
        except (OSError, ValueError, Image.DecompressionBombError):
            return key, None  # the same images CapFilt skipped as corrupt

    def images(url: str, out_tar: bool):
        for raw in iter_tar(url, {}):
            key = raw["__key__"].rsplit("_", 1)[0] if out_tar else raw["__key__"]
            if key in done:
                continue
            for ext in IMAGE_EXTS:
                if ext in raw:
                    done[key] = ""  # claimed; the web and syn{j} pairs of a key carry the same bytes
                    yield key, raw[ext]
                    break

    with ThreadPoolExecutor(2) as pool:  # PIL releases the GIL while decoding and resizing
        for url, out_tar in ((man.get("input", ""), False), (str(out_dir / f"{man['shard']}.tar"), True)):
            if not url:
                continue
            batch: list = []
            for item in images(url, out_tar):
                batch.append(item)
                if len(batch) == 256:  # bounded: a 10k-image shard's bytes never sit in memory at once
                    done.update((k, n) for k, n in pool.map(one, batch) if n)
                    batch = []
            done.update((k, n) for k, n in pool.map(one, batch) if n)
    return {k: v for k, v in done.items() if v}


def _build_shard(job: tuple) -> dict:
    """One shard: its pages, thumbnails and index page; returns its statistics for the summary."""
    import numpy as np

    out_dir, view_dir, si, man, sdir, thumbs, thumb_size, rows_per_page = job
    out_dir, sd = Path(out_dir), Path(view_dir) / "s" / sdir
    sd.mkdir(parents=True, exist_ok=True)
    tmap = _thumbnails(out_dir, man, sd / "t", thumb_size) if thumbs else {}
    enc = _ENC.encode
    web_s: list[float] = []
    web_l: list[int] = []
    syn_s: list[float] = []
    c = {"web_kept": [0, 0, 0], "web_dropped": [0, 0, 0], "syn_kept": 0, "syn_dropped": 0, "syn_empty": 0}
    kept_min, dropped_max = math.inf, -math.inf
    pages: list[list] = []  # [mask hex, [images, web kept, web dropped, syn kept, syn dropped, noisy kept, clean dropped]]
    rows: list[str] = []
    size, mask, pc = 0, 0, [0] * 7
    n_img = 0
    labs: set[int] = set()

    def flush() -> None:
        nonlocal rows, size, mask, pc
        pages.append([format(mask, "x"), pc])
        _write_page(sd, si, man["shard"], len(pages), rows)
        rows, size, mask, pc = [], 0, 0, [0] * 7

    path = out_dir / f"{man['shard']}.scores.jsonl"
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                noisy, key = rec.get("noisy"), str(rec["key"])
                cand = [(t["source"], t["text"], float(t["itm_score"]), bool(t["kept"])) for t in rec["texts"]]
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ViewerError(f"{path}:{lineno}: not a CapFilt scores line ({type(e).__name__}: {e})") from None
            if not all(math.isfinite(t[2]) for t in cand):
                raise ViewerError(f"{path}:{lineno}: an ITM score is not finite: {[t[2] for t in cand]}")
            lab = 2 if noisy is None else int(bool(noisy))
            labs.add(lab)
            texts, rmask, rc = [], 0, [1, 0, 0, 0, 0, 0, 0]  # this row's mask bits and page counts
            for src, text, s, kept in cand:
                b = min(BINS - 1, max(0, int(s * BINS)))  # JS: Math.min(19, Math.floor(s * 20)), same IEEE ops
                if src == "web":
                    cat = lab * 4 + (0 if kept else 1)
                    web_s.append(s)
                    web_l.append(lab)
                    c["web_kept" if kept else "web_dropped"][lab] += 1
                    rc[1 if kept else 2] += 1
                    rc[5] += kept and lab == 1
                    rc[6] += (not kept) and lab == 0
                else:
                    cat = lab * 4 + (2 if kept else 3)
                    syn_s.append(s)
                    c["syn_kept" if kept else "syn_dropped"] += 1
                    c["syn_empty"] += not text
                    rc[3 if kept else 4] += 1
                rmask |= 1 << (cat * BINS + b)
                if kept:
                    kept_min = min(kept_min, s)
                elif text:  # an empty caption is dropped whatever its score
                    dropped_max = max(dropped_max, s)
                texts.append([src, text, s, int(kept)])
            row = enc([key, rec.get("image_id"), lab, tmap.get(key), texts]).replace("<", "\\u003c")
            if rows and (len(rows) >= rows_per_page or size + len(row) > PAGE_DATA_BYTES):
                flush()
            rows.append(row)
            size += len(row) + 1
            mask |= rmask
            pc = [a + b for a, b in zip(pc, rc)]
            n_img += 1
    if rows or not pages:
        flush()
    _write_shard_index(sd, man, pages)
    web_s_a, web_l_a, syn_s_a = np.asarray(web_s), np.asarray(web_l, dtype=np.int8), np.asarray(syn_s)
    hist = np.zeros((4, HIST_BINS), dtype=np.int64)  # web clean, web noisy, web unlabelled, synthetic
    for lab in range(3):
        hist[lab] = _hist(web_s_a[web_l_a == lab])
    hist[3] = _hist(syn_s_a)
    return {"shard": man["shard"], "dir": sdir, "images": n_img, "pages": pages, "counts": c, "hist": hist,
            "web_scores": web_s_a, "web_labels": web_l_a, "syn_scores": syn_s_a, "kept_min": kept_min,
            "dropped_max": dropped_max, "thumbnails": len(tmap), "labels": labs}


def _hist(x: np.ndarray) -> np.ndarray:
    import numpy as np

    idx = np.clip((x * HIST_BINS).astype(np.int64), 0, HIST_BINS - 1)
    return np.bincount(idx, minlength=HIST_BINS)


# ----------------------------------------------------------------------------- writing pages


def _page_name(p: int) -> str:
    return f"p{p:05d}.html"


def _write(path: Path, text: str) -> None:
    data = text.encode("utf-8")
    if len(data) > PAGE_LIMIT_BYTES:  # a guard on the budget arithmetic above, not an expected case
        raise RuntimeError(f"capfilt view: {path} would be {len(data)} bytes (limit {PAGE_LIMIT_BYTES})")
    path.write_bytes(data)


def _write_page(sd: Path, si: int, shard: str, page: int, rows: list[str]) -> None:
    head = _PAGE_HEAD.replace("__TITLE__", html.escape(f"{shard} · page {page} · CapFilt viewer"))
    data = f'{{"si":{si},"shard":{_json_block(shard)},"page":{page},"rows":[{",".join(rows)}]}}'
    _write(sd / _page_name(page), head + data + _PAGE_TAIL)


def _write_shard_index(sd: Path, man: dict, pages: list) -> None:
    data = {"shard": man["shard"], "input": man.get("input", ""), "skipped": man.get("skipped", {}),
            "images": man.get("images"), "pages": [p[1] for p in pages]}
    head = _INDEX_HEAD.replace("__TITLE__", html.escape(f"{man['shard']} · CapFilt viewer"))
    _write(sd / "index.html", head + _json_block(data) + _INDEX_TAIL)


def _svg_hist(title: str, series: list[tuple[str, np.ndarray, str]], threshold: float) -> str:
    """Stacked histogram over [0, 1] with the threshold as a dashed line; inline SVG, no libraries."""
    import numpy as np

    w, h, ml, mr, mt, mb = 900, 240, 56, 14, 34, 38
    pw, ph = w - ml - mr, h - mt - mb
    total = sum(s[1] for s in series)
    top = max(1, int(total.max()) if len(total) else 1)
    step = 10 ** math.floor(math.log10(top)) if top >= 10 else 1
    while top / step > 5:
        step *= 2
    ymax = step * math.ceil(top / step)
    sy = ph / ymax
    bw = pw / HIST_BINS
    out = [f'<svg class="hist" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
           f'aria-label="{html.escape(title)}"><text x="{ml}" y="16" class="st">{html.escape(title)}</text>']
    lx = w - mr - sum(24 + 7 * len(name) for name, _, _ in series)  # legend right-aligned, ~7 px a character
    for name, _, col in series:
        out.append(f'<rect x="{lx}" y="7" width="11" height="11" fill="{col}"/><text x="{lx + 15}" y="17">'
                   f"{html.escape(name)}</text>")
        lx += 24 + 7 * len(name)
    for k in range(int(ymax // step) + 1):
        y = mt + ph - k * step * sy
        out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                   f'<text x="{ml - 6}" y="{y + 4:.1f}" text-anchor="end">{k * step:,}</text>')
    base = np.zeros(HIST_BINS)
    for name, counts, col in series:
        for i, n in enumerate(counts):
            if n:
                y0 = mt + ph - (base[i] + n) * sy
                out.append(f'<rect x="{ml + i * bw + 0.5:.1f}" y="{y0:.1f}" width="{bw - 1:.1f}" '
                           f'height="{n * sy:.1f}" fill="{col}"><title>{html.escape(name)} '
                           f"{i / HIST_BINS:.2f}–{(i + 1) / HIST_BINS:.2f}: {int(n):,}</title></rect>")
        base = base + counts
    for k in range(11):
        x = ml + k * pw / 10
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{mt + ph}" y2="{mt + ph + 4}" stroke="#555"/>'
                   f'<text x="{x:.1f}" y="{mt + ph + 17}" text-anchor="middle">{k / 10:.1f}</text>')
    tx = ml + threshold * pw
    out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{mt + ph}" y2="{mt + ph}" stroke="#555"/>'
               f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="{mt - 6}" y2="{mt + ph}" class="thr"/>'
               f'<text x="{tx + 4:.1f}" y="{mt + 4}" class="thrl">threshold {threshold:.3f}</text>'
               f'<text x="{ml + pw / 2}" y="{h - 4}" text-anchor="middle">ITM match probability</text></svg>')
    return "".join(out)


def _fmt(v: float | None, d: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"


def _pr(scores: np.ndarray, labels: np.ndarray, t: float) -> tuple[float | None, float | None, int]:
    """Precision/recall of 'drop when score < t' at finding noisy web captions; and how many are dropped."""
    drop = scores < t
    noisy = labels == 1
    tp, n_drop, n_noisy = int((drop & noisy).sum()), int(drop.sum()), int(noisy.sum())
    return (tp / n_drop if n_drop else None), (tp / n_noisy if n_noisy else None), n_drop


def _summary(view: Path, src: Path, mans: list[dict], res: list[dict], threshold: float, thr_note: str,
             n_pages: int) -> dict:
    """Write index.html (+ shards-NNNN.html); returns the filter's figures against the noise labels."""
    import numpy as np

    e = html.escape
    n_img = sum(r["images"] for r in res)
    wk = [sum(r["counts"]["web_kept"][i] for r in res) for i in range(3)]
    wd = [sum(r["counts"]["web_dropped"][i] for r in res) for i in range(3)]
    sk, sdr = (sum(r["counts"][k] for r in res) for k in ("syn_kept", "syn_dropped"))
    skipped: dict[str, int] = {}
    for m in mans:
        for k, v in m.get("skipped", {}).items():
            skipped[k] = skipped.get(k, 0) + v
    hist = sum(r["hist"] for r in res)
    ws = np.concatenate([r["web_scores"] for r in res])
    wl = np.concatenate([r["web_labels"] for r in res])
    ss = np.concatenate([r["syn_scores"] for r in res])

    def pct(a: int, b: int) -> str:
        return f"{a:,} <small>({100 * a / b:.1f}%)</small>" if b else f"{a:,}"

    wtot, stot = sum(wk) + sum(wd), sk + sdr
    cards = [("images", f"{n_img:,}"), ("shards", f"{len(res):,}"), ("pairs written", f"{sum(wk) + sk:,}"),
             ("web kept", pct(sum(wk), wtot)), ("web dropped", pct(sum(wd), wtot)),
             ("synthetic kept", pct(sk, stot)), ("synthetic dropped", pct(sdr, stot)),
             ("threshold", f"{threshold:.3f}")]
    body = [f'<h1>CapFilt output <code>{e(str(src))}</code></h1><div class="cards">']
    body += [f'<div class="card"><div class="k">{k}</div><div class="v">{v}</div></div>' for k, v in cards]
    body.append(f'</div><p class="note">Threshold: {e(thr_note)}. Skipped input samples: '
                f'{e(", ".join(f"{k} {v:,}" for k, v in sorted(skipped.items())) or "none")}. '
                f'<a class="btn" href="s/{e(res[0]["dir"])}/{_page_name(1)}">browse the images ▶</a></p>')
    labelled = int((wl != 2).sum())
    quality: dict = {"labelled_web": labelled}
    if labelled:
        lab_s, lab_l = ws[wl != 2], wl[wl != 2]
        tp, fp, fn, tn = wd[1], wd[0], wk[1], wk[0]
        prec = tp / (tp + fp) if tp + fp else None
        rec = tp / (tp + fn) if tp + fn else None
        quality.update(precision=prec, recall=rec, noise_rate=(tp + fn) / labelled, tp=tp, fp=fp, fn=fn, tn=tn)
        body.append(
            '<h2>Filter against the noise labels</h2><p class="note">Web captions whose image carries a '
            '<code>noisy</code> label (written by <code>fastblip data synth</code>): positive = noisy, the '
            f"filter's positive = dropped. {labelled:,} labelled web captions, noise rate "
            f"{_fmt((tp + fn) / labelled)}.</p>"
            f'<div class="cards"><div class="card"><div class="k">precision</div><div class="v">{_fmt(prec)}</div>'
            f'</div><div class="card"><div class="k">recall</div><div class="v">{_fmt(rec)}</div></div></div>'
            '<table class="conf"><tr><th></th><th>kept</th><th>dropped</th></tr>'
            f'<tr><th>clean</th><td class="ok">{tn:,}</td><td class="bad">{fp:,} <small>false alarms</small></td></tr>'
            f'<tr><th>noisy</th><td class="bad">{fn:,} <small>missed</small></td><td class="ok">{tp:,}</td></tr>'
            "</table><h3>At other thresholds</h3><table class=\"num\"><tr><th>threshold</th><th>web dropped</th>"
            "<th>precision</th><th>recall</th></tr>")
        for t in sorted({round(x / 10, 1) for x in range(1, 10)} | {round(threshold, 6)}):
            p, r, nd = _pr(lab_s, lab_l, t)
            cls = ' class="cur"' if abs(t - threshold) < 1e-9 else ""
            body.append(f"<tr{cls}><td>{t:.3f}</td><td>{nd:,}</td><td>{_fmt(p)}</td><td>{_fmt(r)}</td></tr>")
        body.append("</table>")
    body.append("<h2>ITM scores</h2>")
    series = [(f"web {LABELS[i]}" if labelled else "web", hist[i], col)
              for i, col in ((0, "#4c78a8"), (1, "#f58518"), (2, "#9aa5b1")) if hist[i].any()]
    if series:
        body.append(_svg_hist(f"web captions ({wtot:,}; mean {_fmt(float(ws.mean()))}, median "
                              f"{_fmt(float(np.median(ws)))})", series, threshold))
    if stot:
        body.append(_svg_hist(f"synthetic captions ({stot:,}; mean {_fmt(float(ss.mean()))}, median "
                              f"{_fmt(float(np.median(ss)))})", [("synthetic", hist[3], "#54a24b")], threshold))
    lists = [res[i:i + SHARDS_PER_LIST] for i in range(0, len(res), SHARDS_PER_LIST)]
    foot = (f'<p class="note">{n_pages:,} pages of at most {ROWS_PER_PAGE} images. {_HOW}</p>')
    for li, chunk in enumerate(lists):
        nav = " ".join(f'<a href="{_list_name(j)}">{j + 1}</a>' if j != li else f"<b>{j + 1}</b>"
                       for j in range(len(lists))) if len(lists) > 1 else ""
        tab = ['<h2>Shards</h2>', f'<p class="nav">{nav}</p>' if nav else "",
               '<table class="num shards"><tr><th>shard</th><th>images</th><th>pages</th><th>web kept</th>'
               "<th>web dropped</th><th>synthetic kept</th><th>synthetic dropped</th></tr>"]
        for r in chunk:
            c = r["counts"]
            tab.append(f'<tr><td class="l"><a href="s/{e(r["dir"])}/index.html">{e(r["shard"])}</a></td>'
                       f'<td>{r["images"]:,}</td><td>{len(r["pages"]):,}</td><td>{sum(c["web_kept"]):,}</td>'
                       f'<td>{sum(c["web_dropped"]):,}</td><td>{c["syn_kept"]:,}</td><td>{c["syn_dropped"]:,}</td></tr>')
        tab.append("</table>")
        page = (body if li == 0 else [f'<h1>CapFilt output <code>{e(str(src))}</code></h1>'
                                      '<p><a href="index.html">◀ summary</a></p>']) + tab + [foot]
        _write(view / _list_name(li), _SUMMARY_HEAD + "".join(page) + "</main></body></html>")
    return quality


def _list_name(i: int) -> str:
    return "index.html" if i == 0 else f"shards-{i + 1:04d}.html"


# ----------------------------------------------------------------------------- the build


def build_view(output_dir: str | Path, out: str | Path | None = None, *, thumbnails: bool = True,
               threshold: float | None = None, rows_per_page: int = ROWS_PER_PAGE, thumb_size: int = 128,
               workers: int | None = None) -> dict:
    """Write the viewer of the CapFilt output ``output_dir`` into ``out`` (default ``output_dir/view``).

    Returns {"index": path of index.html, "images", "shards", "pages", "thumbnails", "largest_page_bytes",
    "threshold", "threshold_note", "filter": {"labelled_web", and with labels "precision", "recall",
    "noise_rate", "tp", "fp", "fn", "tn"}, "seconds"}."""
    t0 = time.perf_counter()
    src = Path(output_dir)
    if not src.is_dir():
        raise ViewerNotFoundError(f"capfilt view: no such directory: {src}")
    if not 1 <= rows_per_page <= ROWS_PER_PAGE:
        raise ViewerError(f"capfilt view: rows_per_page must be in [1, {ROWS_PER_PAGE}], got {rows_per_page}")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ViewerError(f"capfilt view: threshold must be in [0, 1], got {threshold}")
    view = Path(out) if out is not None else src / "view"
    mans = list_shards(src)
    if view.exists():
        if not (view / MARKER).is_file() and any(view.iterdir()):
            raise ViewerError(f"capfilt view: {view} exists and was not written by capfilt view; "
                                  "give an empty or new --out")
        shutil.rmtree(view)
    (view / "s").mkdir(parents=True)
    (view / MARKER).write_text("written by fastblip capfilt view; rebuilt (deleted) by the next one\n")
    dirs, used = [], set()
    for m in mans:
        d = _safe_name(m["shard"])
        while d in used:  # two shard names hashing or sanitising alike: keep them apart
            d += "_"
        used.add(d)
        dirs.append(d)
    jobs = [(str(src), str(view), i, m, dirs[i], thumbnails, thumb_size, rows_per_page) for i, m in enumerate(mans)]
    n_work = max(1, min(workers or min(2, os.cpu_count() or 1), len(jobs)))
    if workers is None and sum((src / f"{m['shard']}.scores.jsonl").stat().st_size for m in mans) < SERIAL_BYTES:
        n_work = 1
    if n_work > 1:
        # fork where there is one: spawn would re-run a caller's script that lacks an `if __name__ ==
        # "__main__"` guard. The children touch no lock a parent thread may hold (json, numpy, PIL, files).
        ctx = get_context("fork" if "fork" in get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(n_work, mp_context=ctx) as ex:
            res = list(ex.map(_build_shard, jobs, chunksize=max(1, len(jobs) // (8 * n_work))))
    else:
        res = [_build_shard(j) for j in jobs]
    kept_min = min(r["kept_min"] for r in res)
    dropped_max = max(r["dropped_max"] for r in res)
    consistent = lambda t: kept_min >= t > dropped_max  # noqa: E731
    lo, hi = ("none" if dropped_max == -math.inf else f"{dropped_max:.6f}"), (
        "none" if kept_min == math.inf else f"{kept_min:.6f}")
    if threshold is not None:
        thr, note = threshold, "given (--threshold)" + ("" if consistent(threshold) else (
            f"; NOT consistent with the verdicts (highest dropped score {lo}, lowest kept {hi})"))
    elif consistent(DEFAULT_THRESHOLD):
        thr, note = DEFAULT_THRESHOLD, (f"the recipe default, consistent with every verdict (highest dropped "
                                        f"score {lo}, lowest kept {hi}); CapFilt does not record it")
    else:
        thr = kept_min if kept_min != math.inf else min(1.0, max(0.0, dropped_max))
        note = (f"inferred: between the highest dropped score {lo} and the lowest kept {hi} (CapFilt does not "
                f"record it; pass --threshold)")
    pages_js = {"bins": BINS, "threshold": thr, "labels": sorted(set().union(*(r["labels"] for r in res))),
                "shards": [], "masks": []}
    g = 0
    for r in res:
        pages_js["shards"].append([r["dir"], r["shard"], g, len(r["pages"])])
        pages_js["masks"].extend(p[0] for p in r["pages"])
        g += len(r["pages"])
    (view / "pages.js").write_text("window.FB_PAGES=" + _json_block(pages_js) + ";\n", encoding="utf-8")
    quality = _summary(view, src, mans, res, thr, note, g)
    largest = max(p.stat().st_size for p in view.rglob("*.html"))
    return {"index": str(view / "index.html"), "images": sum(r["images"] for r in res), "shards": len(res),
            "pages": g, "thumbnails": sum(r["thumbnails"] for r in res), "largest_page_bytes": largest,
            "threshold": thr, "threshold_note": note, "filter": quality, "seconds": round(time.perf_counter() - t0, 2)}


# ----------------------------------------------------------------------------- CLI (`fastblip capfilt view`)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``fastblip capfilt view OUTPUT_DIR``, on the capfilt parser (its key=value positionals
    leave no room for a sub-parser)."""
    g = p.add_argument_group("fastblip capfilt view OUTPUT_DIR [options]",
                             "a static HTML viewer of a CapFilt output (opens from file://, no server)")
    g.add_argument("--out", metavar="DIR", help="viewer directory (default OUTPUT_DIR/view)")
    g.add_argument("--no-thumbnails", action="store_true", help="no thumbnails (1M images in ~6-13 s on 2 cores)")
    g.add_argument("--threshold", type=float, metavar="T",
                   help="the run's threshold (CapFilt does not record it; default: inferred from the verdicts)")


def view_cli(args: argparse.Namespace) -> int:
    rest = args.overrides[1:]
    if len(rest) != 1 or getattr(args, "recipe", None):
        raise ViewerError("usage: fastblip capfilt view OUTPUT_DIR [--out DIR] [--no-thumbnails] [--threshold T]")
    r = build_view(rest[0], args.out, thumbnails=not args.no_thumbnails, threshold=args.threshold)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"capfilt view: {r['images']:,} images, {r['pages']:,} pages, {r['thumbnails']:,} thumbnails in "
              f"{r['seconds']:.1f} s; open file://{Path(r['index']).resolve()}")
    return 0


def reject_view_options(args: argparse.Namespace) -> None:
    """A CapFilt run given the viewer's options: say so instead of ignoring them."""
    if args.out is not None or args.no_thumbnails or args.threshold is not None:
        raise ViewerError("--out, --no-thumbnails and --threshold belong to 'fastblip capfilt view OUTPUT_DIR'")


# ----------------------------------------------------------------------------- page templates

_HOW = ("Filters and sorting work on the open page's rows. Across pages, a precomputed index (pages.js: per page, "
        "which noise label x source x verdict x 0.05-wide score bins occur) counts the pages that may hold "
        "matches and finds the previous/next one (exact up to the 0.05-wide bins at the score range's ends). The score "
        "range is lo ≤ score < hi (hi = 1 includes 1), like the threshold rule: kept means score ≥ threshold.")

_CSS = """
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",
sans-serif;color:#1f2328;background:#f6f8fa}main{max-width:1180px;margin:0 auto;padding:16px 20px 40px}
h1{font-size:20px;margin:4px 0 12px}h2{font-size:17px;margin:22px 0 8px}h3{font-size:15px;margin:14px 0 6px}
code{font-size:13px;background:#eaeef2;padding:1px 4px;border-radius:4px}a{color:#0969da}small{color:#59636e}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{background:#fff;border:1px solid #d1d9e0;border-radius:8px;
padding:8px 14px;min-width:120px}.card .k{color:#59636e;font-size:12px;text-transform:uppercase}
.card .v{font-size:20px;font-weight:600}.note{color:#444;max-width:950px}.btn{display:inline-block;
margin-left:8px;padding:3px 10px;border:1px solid #0969da;border-radius:6px;text-decoration:none}
table{border-collapse:collapse;background:#fff}th,td{border:1px solid #d1d9e0;padding:4px 8px;vertical-align:top}
th{background:#eef1f4;text-align:left}table.num td{text-align:right;font-variant-numeric:tabular-nums}
table.num td.l{text-align:left}tr.cur td{font-weight:700}.ok{background:#dafbe1}.bad{background:#ffebe9}
svg.hist{display:block;background:#fff;border:1px solid #d1d9e0;border-radius:8px;margin:8px 0}
svg text{font-size:11px;fill:#333}svg .st{font-size:13px;font-weight:600}.grid{stroke:#e5e8eb}
.thr{stroke:#cf222e;stroke-width:1.5;stroke-dasharray:5 3}.thrl{fill:#cf222e}
"""

_PAGE_CSS = """
header{position:sticky;top:0;z-index:2;background:#fff;border-bottom:1px solid #d1d9e0;padding:8px 20px;
box-shadow:0 1px 3px rgba(0,0,0,.06)}header .row{display:flex;flex-wrap:wrap;gap:6px 18px;align-items:center;
max-width:1180px;margin:0 auto}header .row+.row{margin-top:6px}fieldset{border:0;padding:0;margin:0;display:flex;
gap:8px;align-items:center}legend{float:left;font-weight:600;margin-right:4px;padding:0}
input[type=number]{width:72px}#status{color:#444}#rows td.n{color:#8c959f;text-align:right;width:40px}
#rows td.img{width:140px;text-align:center}#rows img{max-width:128px;max-height:128px;border-radius:4px;
display:block;margin:0 auto}.noimg{color:#8c959f;font-size:12px}.key{font-family:ui-monospace,"DejaVu Sans Mono",
monospace;font-size:12px;overflow-wrap:anywhere}#rows td.k{min-width:110px}.lab{display:inline-block;margin-top:4px;padding:0 6px;
border-radius:10px;font-size:12px}.lab.noisy{background:#fff1e5;color:#9a4a00;border:1px solid #f5b57a}
.lab.clean{background:#eef1f4;color:#444;border:1px solid #d1d9e0}.t{display:flex;gap:8px;align-items:baseline;
padding:3px 0}.t+.t{border-top:1px dashed #e1e4e8}.sc{flex:none;font-variant-numeric:tabular-nums;
font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12px;padding:1px 6px;border-radius:4px;
white-space:nowrap}.k1 .sc{background:#dafbe1;color:#116329;border:1px solid #4ac26b}.k0 .sc{background:#ffebe9;
color:#a40e26;border:1px solid #ff8182}.k0 .cap{color:#6e4a4a}.cap{font-size:15px}.src{color:#8c959f;font-size:11px}
.t.off{opacity:.28}th.sort{cursor:pointer;user-select:none}th.sort:after{content:" ⇅";color:#8c959f}
th.asc:after{content:" ▲";color:#0969da}th.desc:after{content:" ▼";color:#0969da}.pn a,.pn b{margin:0 3px}
#empty{padding:30px;text-align:center;color:#59636e;background:#fff;border:1px solid #d1d9e0}
button{font:inherit;padding:2px 10px}
"""

_PAGE_HEAD = ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><link rel=\"icon\" href=\"data:,\">"
              "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>__TITLE__</title><style>"
              + _CSS + _PAGE_CSS + "</style></head><body>"
              "<header><div class=\"row\"><b>CapFilt viewer</b><a href=\"../../index.html\">summary</a>"
              "<a href=\"index.html\" id=\"shardlink\">shard</a><span class=\"pn\" id=\"pn\"></span></div>"
              "<div class=\"row\"><fieldset><legend>verdict</legend><label><input type=\"checkbox\" data-f=\"v\" "
              "value=\"kept\" checked> kept</label><label><input type=\"checkbox\" data-f=\"v\" value=\"dropped\" "
              "checked> dropped</label></fieldset><fieldset><legend>source</legend><label><input type=\"checkbox\" "
              "data-f=\"s\" value=\"web\" checked> web</label><label><input type=\"checkbox\" data-f=\"s\" "
              "value=\"syn\" checked> synthetic</label></fieldset><fieldset id=\"labf\"><legend>noise label</legend>"
              "</fieldset><fieldset><legend>score</legend>from <input type=\"number\" id=\"lo\" min=\"0\" max=\"1\" "
              "step=\"0.001\" value=\"0\"> to below <input type=\"number\" id=\"hi\" min=\"0\" max=\"1\" "
              "step=\"0.001\" value=\"1\" title=\"1 includes 1\"></fieldset><fieldset><legend>sort</legend><select id=\"sort\"><option value=\"order\">"
              "file order</option><option value=\"web-asc\">web score ▲</option><option value=\"web-desc\">web "
              "score ▼</option><option value=\"syn-asc\">synthetic score ▲</option><option value=\"syn-desc\">"
              "synthetic score ▼</option><option value=\"key-asc\">key</option></select></fieldset>"
              "</div><div class=\"row\"><button id=\"reset\">reset filters</button><span id=\"status\"></span>"
              "<button id=\"prevm\">◀ previous match</button><button id=\"nextm\">next match ▶</button></div>"
              "</header><main><noscript>This page draws its table with JavaScript.</noscript>"
              "<table id=\"tab\" style=\"width:100%\"><thead><tr><th>#</th><th>image</th><th class=\"sort\" "
              "data-s=\"key\">key</th><th class=\"sort\" data-s=\"web\">web caption</th><th class=\"sort\" "
              "data-s=\"syn\">synthetic caption(s)</th></tr></thead><tbody id=\"rows\"></tbody></table>"
              "<div id=\"empty\" hidden>No image on this page matches the filter.</div><p class=\"note\">"
              + _HOW + "</p></main><script src=\"../../pages.js\"></script>"
              "<script type=\"application/json\" id=\"data\">")

_PAGE_JS = r"""
(function () {
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const FB = window.FB_PAGES || null;
const $ = (id) => document.getElementById(id);
const LABELS = ["clean", "noisy", "unlabelled"];
const THR = FB ? FB.threshold : 0.5;
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;  // captions are untrusted: never innerHTML
  return e;
}
function fmt(s, kept) {  // 3 decimals, more only where rounding would cross the threshold
  let t = s.toFixed(3);
  if ((kept && +t < THR) || (!kept && +t >= THR)) t = s.toFixed(6);
  return t;
}
// ---- navigation: the page's own shard statically, across shards through pages.js
const pad = (n) => String(n).padStart(5, "0");
let G = -1, NP = 0;
if (FB) {
  const sh = FB.shards[D.si];
  G = sh[2] + D.page - 1; NP = FB.masks.length;
}
function pageHref(g) {
  let lo = 0, hi = FB.shards.length - 1;
  while (lo < hi) { const m = (lo + hi + 1) >> 1; if (FB.shards[m][2] <= g) lo = m; else hi = m - 1; }
  const sh = FB.shards[lo];
  return "../" + encodeURIComponent(sh[0]) + "/p" + pad(g - sh[2] + 1) + ".html";
}
// ---- rows
const labsHere = new Set();
const rows = D.rows.map((r, i) => {
  const [key, iid, lab, thumb, texts] = r;
  labsHere.add(lab);
  const tr = el("tr");
  tr.appendChild(el("td", "n", String(i + 1)));
  const ti = el("td", "img");
  if (thumb) { const im = el("img"); im.loading = "lazy"; im.alt = key; im.src = "t/" + encodeURIComponent(thumb); ti.appendChild(im); }
  else ti.appendChild(el("span", "noimg", "no thumbnail"));
  tr.appendChild(ti);
  const tk = el("td", "k");
  tk.appendChild(el("div", "key", key));
  if (iid !== null && iid !== undefined) tk.appendChild(el("div", "src", "image id " + iid));
  if (lab < 2) { const b = el("span", "lab " + LABELS[lab], LABELS[lab]); b.title = "the web caption's noise label"; tk.appendChild(b); }
  tr.appendChild(tk);
  const tw = el("td"), tsy = el("td");
  const tx = texts.map(([src, text, s, kept]) => {
    const d = el("div", "t k" + kept);
    d.appendChild(el("span", "sc", fmt(s, kept) + (kept ? " kept" : " dropped")));
    const c = el("span", "cap", text || "(empty caption)");
    d.appendChild(c);
    if (src !== "web") d.appendChild(el("span", "src", src));
    (src === "web" ? tw : tsy).appendChild(d);
    return {d, web: src === "web", s, kept: !!kept};
  });
  if (!tw.childNodes.length) tw.appendChild(el("span", "noimg", "no web caption"));
  if (!tsy.childNodes.length) tsy.appendChild(el("span", "noimg", "none"));
  tr.appendChild(tw); tr.appendChild(tsy);
  const best = (w) => { let b = null; for (const t of tx) if (t.web === w && (b === null || t.s > b)) b = t.s; return b; };
  return {tr, i, key, lab, tx, web: best(true), syn: best(false)};
});
const labsAll = FB ? new Set(FB.labels) : labsHere;
for (const l of [0, 1, 2]) {
  if (!labsAll.has(l)) continue;
  const lb = el("label"), cb = el("input");
  cb.type = "checkbox"; cb.dataset.f = "l"; cb.value = LABELS[l]; cb.checked = true;
  lb.appendChild(cb); lb.appendChild(document.createTextNode(" " + LABELS[l]));
  $("labf").appendChild(lb);
}
if (labsAll.size < 2) $("labf").hidden = true;
// ---- state <-> URL hash
function readState() {
  const q = new URLSearchParams(location.hash.slice(1));
  const set = (k, def) => new Set(q.has(k) ? q.get(k).split(",").filter(Boolean) : def);
  const num = (k, def) => { const v = parseFloat(q.get(k)); return isFinite(v) ? Math.min(1, Math.max(0, v)) : def; };
  return {v: set("v", ["kept", "dropped"]), s: set("s", ["web", "syn"]), l: set("l", LABELS),
          lo: num("lo", 0), hi: num("hi", 1), sort: q.get("sort") || "order", seek: parseInt(q.get("seek") || "0", 10)};
}
function hashOf(st) {
  const p = [];
  if (st.v.size !== 2) p.push("v=" + [...st.v].join(","));
  if (st.s.size !== 2) p.push("s=" + [...st.s].join(","));
  if (LABELS.some((l) => !st.l.has(l))) p.push("l=" + [...st.l].join(","));
  if (st.lo > 0) p.push("lo=" + st.lo);
  if (st.hi < 1) p.push("hi=" + st.hi);
  if (st.sort !== "order") p.push("sort=" + st.sort);
  return p.join("&");
}
let S = readState();
function toInputs() {
  document.querySelectorAll("input[data-f]").forEach((cb) => { cb.checked = S[cb.dataset.f].has(cb.value); });
  $("lo").value = S.lo; $("hi").value = S.hi; $("sort").value = S.sort;
}
function fromInputs() {
  const st = {v: new Set(), s: new Set(), l: new Set(LABELS.filter((l, i) => !labsAll.has(i))), sort: $("sort").value, seek: 0};
  document.querySelectorAll("input[data-f]").forEach((cb) => { if (cb.checked) st[cb.dataset.f].add(cb.value); });
  const n = (id, def) => { const v = parseFloat($(id).value); return isFinite(v) ? Math.min(1, Math.max(0, v)) : def; };
  st.lo = n("lo", 0); st.hi = n("hi", 1);
  return st;
}
// ---- the cross-page index: bit (label*4 + src*2 + dropped) * bins + bin
// bins are monotone in the score, so [bin(lo), bin(hi)] holds every matching score: a superset, exact to a bin
function filterMask(st) {
  const B = FB.bins; let m = 0n;
  const binOf = (s) => Math.min(B - 1, Math.max(0, Math.floor(s * B)));  // Python: min(19, max(0, int(s * 20)))
  for (let l = 0; l < 3; l++) {
    if (!st.l.has(LABELS[l])) continue;
    for (const [si, s] of [[0, "web"], [1, "syn"]]) {
      if (!st.s.has(s)) continue;
      for (const [vi, v] of [[0, "kept"], [1, "dropped"]]) {
        if (!st.v.has(v)) continue;
        const cat = l * 4 + si * 2 + vi;
        for (let b = binOf(st.lo); b <= binOf(st.hi); b++) m |= 1n << BigInt(cat * B + b);
      }
    }
  }
  return m;
}
let MASKS = null;
function pageMatches(st) {
  if (!FB) return null;
  if (!MASKS) MASKS = FB.masks.map((h) => BigInt("0x" + h));
  const fm = filterMask(st);
  return MASKS.map((m) => (m & fm) !== 0n);
}
function seekFrom(match, dir) {
  for (let g = G + dir; g >= 0 && g < NP; g += dir) if (match[g]) return g;
  return -1;
}
// ---- apply
function apply(fromUser) {
  let shown = 0;
  for (const r of rows) {
    let any = false;
    const labOk = S.l.has(LABELS[r.lab]);
    for (const t of r.tx) {
      const ok = labOk && S.s.has(t.web ? "web" : "syn") && S.v.has(t.kept ? "kept" : "dropped") && t.s >= S.lo && (t.s < S.hi || S.hi >= 1);
      t.d.classList.toggle("off", !ok);
      any = any || ok;
    }
    r.tr.hidden = !any;
    shown += any;
  }
  const [col, dir] = S.sort === "order" ? ["order", "asc"] : S.sort.split("-");
  const sign = dir === "desc" ? -1 : 1;
  const val = (r) => (col === "web" ? r.web : col === "syn" ? r.syn : null);
  const sorted = rows.slice().sort((a, b) => {
    if (col === "key") return a.key < b.key ? -1 : a.key > b.key ? 1 : 0;
    if (col === "order") return a.i - b.i;
    const x = val(a), y = val(b);
    if (x === null || y === null) return (x === null) - (y === null) || a.i - b.i;  // no score: last
    return sign * (x - y) || a.i - b.i;
  });
  const tb = $("rows");
  sorted.forEach((r, k) => { r.tr.firstChild.textContent = String(k + 1); tb.appendChild(r.tr); });
  document.querySelectorAll("th.sort").forEach((th) => {
    th.classList.toggle("asc", th.dataset.s === col && dir === "asc" && col !== "order");
    th.classList.toggle("desc", th.dataset.s === col && dir === "desc");
  });
  $("empty").hidden = shown > 0;
  const h = hashOf(S);
  try { history.replaceState(null, "", h ? "#" + h : location.pathname); } catch (e) { /* file:// quirks */ }
  const suffix = h ? "#" + h : "";
  document.querySelectorAll("a[data-p]").forEach((a) => { a.href = a.dataset.p + suffix; });
  let msg = "showing " + shown + " of " + rows.length + " images on this page";
  const match = pageMatches(S);
  if (match) {
    const sh = FB.shards[D.si];
    let inShard = 0, all = 0;
    match.forEach((x, g) => { all += x; if (g >= sh[2] && g < sh[2] + sh[3]) inShard += x; });
    msg += " · pages that may hold matches: " + inShard + " of " + sh[3] + " in this shard, " + all + " of " + NP + " overall";
    const p = seekFrom(match, -1), n = seekFrom(match, 1);
    $("prevm").disabled = p < 0; $("nextm").disabled = n < 0;
    $("prevm").onclick = () => { location.href = pageHref(p) + "#" + (h ? h + "&" : "") + "seek=-1"; };
    $("nextm").onclick = () => { location.href = pageHref(n) + "#" + (h ? h + "&" : "") + "seek=1"; };
    // a bin-level match without an exact one: keep going the way the user was going
    if (!fromUser && S.seek && shown === 0) {
      const g = seekFrom(match, S.seek);
      if (g >= 0) { location.replace(pageHref(g) + "#" + (h ? h + "&" : "") + "seek=" + S.seek); return; }
    }
  } else { $("prevm").hidden = $("nextm").hidden = true; }
  $("status").textContent = msg;
}
// ---- page links: this shard's pages statically; the neighbours across shards from pages.js
(function nav() {
  const pn = $("pn");
  const add = (label, href) => { const a = el("a", null, label); a.dataset.p = href; a.href = href; pn.appendChild(a); };
  const sh = FB ? FB.shards[D.si] : null;
  $("shardlink").textContent = "shard " + D.shard;
  const n = sh ? sh[3] : D.page;
  if (FB && G > 0) add("◀ previous page", pageHref(G - 1));
  pn.appendChild(el("b", null, " page " + D.page + (sh ? " of " + n : "") + " "));
  if (FB && G + 1 < NP) add("next page ▶", pageHref(G + 1));
})();
toInputs();
document.querySelectorAll("header input, header select").forEach((x) => x.addEventListener("change", () => { S = fromInputs(); apply(true); }));
$("reset").onclick = () => { S = {v: new Set(["kept", "dropped"]), s: new Set(["web", "syn"]), l: new Set(LABELS), lo: 0, hi: 1, sort: "order", seek: 0}; toInputs(); apply(true); };
document.querySelectorAll("th.sort").forEach((th) => th.addEventListener("click", () => {
  const c = th.dataset.s, [col, dir] = S.sort.split("-");
  S.sort = c + "-" + (col === c ? (dir === "asc" ? "desc" : "asc") : (c === "key" ? "asc" : "desc"));
  toInputs(); apply(true);
}));
window.addEventListener("hashchange", () => { S = readState(); toInputs(); apply(false); });  // an edited URL
apply(false);
})();
"""

_PAGE_TAIL = "</script><script>" + _PAGE_JS + "</script></body></html>"

_INDEX_JS = r"""
(function () {
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const $ = (id) => document.getElementById(id);
const cell = (tr, text, cls) => { const td = document.createElement("td"); td.textContent = text; if (cls) td.className = cls; tr.appendChild(td); return td; };
document.title = D.shard + " · CapFilt viewer";
$("name").textContent = D.shard;
$("input").textContent = D.input || "?";
$("skipped").textContent = Object.entries(D.skipped).map(([k, v]) => k + " " + v).join(", ") || "none";
const labelled = D.pages.some((p) => p[5] || p[6]);
if (!labelled) document.querySelectorAll(".lbl").forEach((e) => e.remove());
const tb = $("pages");
D.pages.forEach((p, i) => {
  const tr = document.createElement("tr");
  const a = document.createElement("a");
  a.href = "p" + String(i + 1).padStart(5, "0") + ".html"; a.textContent = "page " + (i + 1);
  cell(tr, "", "l").appendChild(a);
  p.slice(0, labelled ? 7 : 5).forEach((v) => cell(tr, v.toLocaleString()));
  tb.appendChild(tr);
});
})();
"""

_INDEX_HEAD = ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><link rel=\"icon\" href=\"data:,\">"
               "<title>__TITLE__</title><style>" + _CSS + "</style></head><body><main>"
               "<p><a href=\"../../index.html\">◀ summary</a></p><h1>Shard <code id=\"name\"></code></h1>"
               "<p class=\"note\">input <code id=\"input\"></code> · skipped samples: <span id=\"skipped\"></span></p>"
               "<table class=\"num\"><thead><tr><th>page</th><th>images</th><th>web kept</th><th>web dropped</th>"
               "<th>synthetic kept</th><th>synthetic dropped</th><th class=\"lbl\">noisy web kept (missed)</th>"
               "<th class=\"lbl\">clean web dropped (false alarms)</th></tr></thead><tbody id=\"pages\"></tbody>"
               "</table></main><script type=\"application/json\" id=\"data\">")
_INDEX_TAIL = "</script><script>" + _INDEX_JS + "</script></body></html>"

_SUMMARY_HEAD = ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><link rel=\"icon\" href=\"data:,\">"
                 "<title>CapFilt viewer</title><style>" + _CSS + "</style></head><body><main>")

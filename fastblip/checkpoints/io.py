"""Low-level checkpoint I/O shared by every format: safe reading, strict loading into a built model, the
fastblip directory format, tie groups, and released-name downloads.

Safety: ``.pth``/``.bin`` files are read with ``torch.load(weights_only=True)`` and everything else with
safetensors, so loading a checkpoint never executes pickled code. A file that is no checkpoint at all (a JPEG,
a text file) is one ``CheckpointError`` line, as is a tensor holding NaN or inf (it would run silently and
produce empty captions).

Writing: every directory format is written to ``DST.tmp-<pid>`` and renamed into place (``publish_dir``), so
a reader never sees half a checkpoint; an existing DST is replaced only when it is a checkpoint directory
(a directory holding anything else is refused, never deleted).

Strictness (DESIGN §3: ``fastblip.load`` is strict): the first unknown key or wrong shape raises one
``CheckpointError`` naming it; missing tensors are listed. Tied tensors (LM head = word embeddings, the
pretraining encoder/decoder sharing) form *tie groups*: one member present in the file is enough, and every
member is the same ``Parameter`` object after loading because ties are built by the model's constructor.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from fastblip.config import FORMAT_VERSION, ModelConfig
from fastblip.errors import CheckpointError, ConfigError, NotFoundError, RunDirError

log = logging.getLogger("fastblip")

CONFIG_NAME = "fastblip.json"
WEIGHTS_NAME = "model.safetensors"

# Tensors whose first-dim length depends on the image size: interpolated on load when it differs.
POS_EMBED_KEYS = ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed")

# The official release (github salesforce/BLIP README); all under one bucket.
_BUCKET = "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/"
RELEASED = {
    name: _BUCKET + name + ".pth"
    for name in (
        "model_base_14M", "model_base", "model_base_capfilt_large", "model_large",
        "model_base_retrieval_coco", "model_large_retrieval_coco", "model_base_retrieval_flickr",
        "model_large_retrieval_flickr", "model_base_caption_capfilt_large", "model_large_caption",
        "model_vqa", "model_base_vqa_capfilt_large", "model_base_nlvr",
    )
}


class CheckpointNotFoundError(NotFoundError):
    """A checkpoint path that does not exist or cannot be read."""


class CheckpointDownloadError(CheckpointError):
    """A released name / URL that cannot be downloaded (offline, blocked, HTTP error)."""


# ----------------------------------------------------------------------------- reading files


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_tensor_file(path: Path, what: str = "checkpoint") -> dict:
    """A safetensors file -> dict of tensors; anything else -> ``torch.load(weights_only=True)`` object."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"{what} not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except MemoryError:
            raise
        except Exception as e:  # SafetensorError, OSError, a header that is no JSON, ...
            raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message opens with advice to retry with weights_only=False: never relay that; keep its reason
        m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n|$)", str(e))
        reason = m.group(1).strip() if m else _first_line(e)
        g = re.search(r"GLOBAL (\S+)", reason)
        if g is None and "Unsupported operand" in reason:  # not pickle data at all: a JPEG, a text file, ...
            raise CheckpointError(f"{path}: not a PyTorch {what} ({reason})") from None
        what_ = f"it holds a pickled {g.group(1)}, and unpickling it could run code" if g else reason
        raise CheckpointError(f"{path}: refused by torch.load(weights_only=True): {what_}") from e
    except MemoryError:
        raise
    except Exception as e:
        # torch.load on bytes that are no checkpoint raises whatever its unpickler trips over first (KeyError: 101
        # for a text file, struct.error, UnicodeDecodeError, RuntimeError of the zip reader, ...): all one line
        raise CheckpointError(f"{path}: not a PyTorch {what} ({type(e).__name__}: {_first_line(e)})") from None


def check_finite(sd: Mapping, source: str) -> None:
    """Refuse a floating tensor holding NaN or inf, naming it (a NaN weight loads silently and every caption
    comes out empty). One pass over the weights: ~0.1 s per GB on a CPU core."""
    for k, v in sd.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all()):
            n = int((~torch.isfinite(v)).sum())
            raise CheckpointError(f"{source}: tensor '{k}' holds {n} non-finite value(s) (NaN/inf) of "
                                  f"{v.numel()}: the checkpoint is corrupt")


def publish_dir(tmp: Path, final: Path) -> Path:
    """Move the finished directory ``tmp`` to ``final``. An older ``final`` is moved aside first and deleted
    after, so at every moment ``final`` is absent or a complete directory; a crash between the two renames
    leaves ``final.old-<pid>`` and ``tmp``, both complete (a run's next start removes them and re-exports)."""
    old = None
    if final.exists() or final.is_symlink():
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _check_replaceable(dst: Path) -> None:
    """A directory may be replaced by a checkpoint only when it is empty or a checkpoint directory."""
    if dst.is_symlink() or (dst.exists() and not dst.is_dir()):
        raise RunDirError(f"{dst}: exists and is not a directory; refusing to replace it with a checkpoint")
    if dst.is_dir():
        names = {p.name for p in dst.iterdir()}
        if names and not ({CONFIG_NAME, "config.json"} & names):
            raise RunDirError(f"{dst}: a directory holding files that are no checkpoint ({', '.join(sorted(names)[:3])}"
                              "...); refusing to replace it: choose another destination")


def write_dir_atomic(dst: Path, write) -> Path:
    """``write(tmp_dir)`` then ``publish_dir``: the directory formats' one way of writing."""
    dst = Path(dst)
    _check_replaceable(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f"{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        return publish_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- tie groups


def tie_groups(model: nn.Module) -> list[list[str]]:
    """State-dict keys grouped by tensor identity (each group = one storage, all its aliases, in order)."""
    groups: dict[int, list[str]] = {}
    for k, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(k)
    return list(groups.values())


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """One entry per tie group (its first key), detached and contiguous: what the fastblip format stores."""
    sd = model.state_dict(keep_vars=True)
    return {g[0]: sd[g[0]].detach().contiguous() for g in tie_groups(model)}


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every alias written out (as the official files have them)."""
    return {k: v.detach() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- strict loading


def _fmt_shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def load_strict(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str) -> dict:
    """Copy ``sd`` into ``model`` with the strict rules above; pos-embeds of another grid are interpolated.

    Returns a report ``{"loaded": n, "interpolated": [keys], "ignored": [keys]}``.
    """
    from fastblip.models.vit import interpolate_pos_embed

    target = model.state_dict(keep_vars=True)
    owner = {k: i for i, g in enumerate(tie_groups(model)) for k in g}
    n_groups = len(set(owner.values()))
    check_finite(sd, source)
    ignored = [k for k in sd if k.endswith("position_ids")]  # a buffer, rebuilt by the model (BLIP_SPEC §6)
    kind = getattr(model, "kind", type(model).__name__)
    prepared: dict[str, torch.Tensor] = {}
    interpolated = []
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue
        if k not in target:
            raise CheckpointError(f"{source}: unknown key '{k}' for a '{kind}' model (no such tensor)")
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{source}: key '{k}' holds a {type(v).__name__}, not a tensor")
        want = target[k]
        if k in POS_EMBED_KEYS and v.ndim == 3 and want.ndim == 3 and v.shape[2] == want.shape[2] \
                and v.shape[1] != want.shape[1]:
            try:
                v = interpolate_pos_embed(v, want.shape[1] - 1)
            except ValueError as e:
                raise CheckpointError(f"{source}: key '{k}': {e}") from None
            interpolated.append(k)
        if tuple(v.shape) != tuple(want.shape):
            raise CheckpointError(f"{source}: key '{k}' has shape {_fmt_shape(v)}, the model expects "
                                  f"{_fmt_shape(want)}")
        prepared[k] = v
    seen: dict[int, str] = {}
    for k in prepared:
        g = owner[k]
        if g in seen and not torch.equal(prepared[seen[g]].to(prepared[k].dtype), prepared[k]):
            log.warning("%s: tied tensors '%s' and '%s' differ; using '%s'", source, seen[g], k, seen[g])
            continue
        seen.setdefault(g, k)
    if len(seen) < n_groups:
        missing = [g[0] for g in tie_groups(model) if owner[g[0]] not in seen]
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise CheckpointError(f"{source}: missing {len(missing)} tensor(s) for a '{kind}' model: {shown}")
    with torch.no_grad():
        for k in seen.values():
            target[k].copy_(prepared[k])
    return {"loaded": len(prepared), "interpolated": interpolated, "ignored": ignored}


# ----------------------------------------------------------------------------- fastblip directory format


def is_fastblip_dir(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_NAME).is_file()


def read_fastblip_config(path: Path) -> ModelConfig:
    cfg_path = path / CONFIG_NAME
    try:
        d = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: unreadable ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object (the model config), got a {type(d).__name__}")
    v = d.get("format_version")
    if not isinstance(v, int):
        raise CheckpointError(f"{path / CONFIG_NAME}: no integer 'format_version'")
    if v > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {v} is newer than this fastblip ({FORMAT_VERSION}); "
                              "upgrade fastblip")
    return config_from_dict(d, str(cfg_path))


def config_from_dict(d, source: str) -> ModelConfig:
    """A ModelConfig from a checkpoint's config dict, validated (sizes, heads, ...); one line naming the file."""
    if not isinstance(d, Mapping):
        raise CheckpointError(f"{source}: the model config is a {type(d).__name__}, not a mapping")
    try:
        return ModelConfig.from_dict(dict(d)).validate(source)
    except ConfigError as e:
        msg = str(e).replace("unknown recipe key", "unknown config key").replace("recipe key", "config key")
        raise CheckpointError(msg if msg.startswith(source) else f"{source}: {msg}") from None


def _umask() -> int:
    """The process umask, read without changing it where Linux tells it (os.umask sets it process-wide)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_safetensors(tensors: dict, path: Path, metadata: dict | None = None) -> Path:
    """``safetensors.torch.save_file`` with the file mode every other file of the checkpoint gets (0644 under the
    usual umask 022): safetensors 0.8 writes through a private temp file and leaves its 0600."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())
    return path


def write_fastblip_files(model: nn.Module, path: Path, extra: dict | None = None) -> Path:
    """``fastblip.json`` + ``model.safetensors`` (tied tensors once) + tokenizer files into ``path`` as is
    (callers write into a temp directory and publish it); ``extra``: more JSON files, name -> object."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.cpu() for k, v in unique_state_dict(model).items()}
    save_safetensors(tensors, path / WEIGHTS_NAME, metadata={"format": "pt", "kind": model.cfg.kind})
    (path / CONFIG_NAME).write_text(model.cfg.to_json())
    model.tokenizer.save(path)
    for name, obj in (extra or {}).items():
        (path / name).write_text(json.dumps(obj, indent=1))
    return path


def save_fastblip_dir(model: nn.Module, path: Path) -> Path:
    """The fastblip directory format at ``path``, written to a temp directory and renamed into place."""
    return write_dir_atomic(Path(path), lambda tmp: write_fastblip_files(model, tmp))


# ----------------------------------------------------------------------------- released names / URLs


def is_remote(src: str) -> bool:
    s = src.removesuffix(".pth")
    return src.startswith(("http://", "https://")) or (s in RELEASED and not Path(src).exists())


def download(src: str) -> dict:
    """Released name or URL -> loaded object (cached under torch.hub's dir); offline -> one clear error."""
    import http.client
    import urllib.error

    url = src if src.startswith(("http://", "https://")) else RELEASED[src.removesuffix(".pth")]
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True, progress=False)
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise CheckpointDownloadError(
            f"cannot download '{src}' from {url} (offline or blocked: {reason}); download it elsewhere and pass "
            f"the file path, or place it in {torch.hub.get_dir()}/checkpoints/") from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{url}: refused by torch.load(weights_only=True): {e}") from None

"""The base-model state cache: activation statistics and 3-way state labels, packed 5 per byte.

The frozen base model runs once over the replay set (batched, length-sorted, padding-aware). Per
selected hidden-state index and hidden unit ``d`` we compute ``mu_d`` and ``sigma_d`` over every real
token, the thresholds ``pos = mu + k*sigma`` / ``neg = mu - k*sigma``, and label every element
``NEG`` (h <= neg), ``POS`` (h >= pos) or ``INACTIVE``. Labels are stored 5 per byte in base 3
(1.6 bits each: 1/20 of the fp32 activations; plain 2-bit packing would be exactly 1/16 before the
thresholds are counted; see :mod:`gere_plugin.cache.labels`).

Cache folder layout (written by :func:`gere_plugin.cache.io.save_folder_atomically`: a temporary
sibling folder, fsynced, then renamed into place)::

    meta.json              format version, fingerprints, shapes, sha256 + size of each data file
    thresholds.safetensors mu, std, pos, neg [L, H] (fp32) and sample offsets [N+1] (int64)
    labels.bin             uint8 [total_tokens, L, ceil(H/5)]
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..data.replay_set import ReplaySet
from ..model.hidden import forward_hidden
from ..model.introspection import model_device
from .folders import FORMAT_VERSION, LABELS, META, STATE_CACHE, THRESHOLDS, StateCacheError
from .io import CachePlan, file_sha256, plan_folder, save_folder_atomically
from .labels import label_states, pack_trits, packed_width, unpack_trits

logger = logging.getLogger(__name__)


@dataclass
class StateCache:
    """Thresholds and packed state labels of the base model on a replay set."""

    mu: torch.Tensor  # [L, H] fp32
    std: torch.Tensor  # [L, H]
    pos: torch.Tensor  # [L, H]
    neg: torch.Tensor  # [L, H]
    packed: torch.Tensor  # uint8 [total_tokens, L, ceil(H/5)] (base-3, see pack_trits)
    offsets: torch.Tensor  # int64 [N+1]
    meta: dict

    @property
    def hidden_size(self) -> int:
        return int(self.meta["hidden_size"])

    @property
    def layers(self) -> list[int]:
        return list(self.meta["layers"])

    def labels_for(self, indices: Sequence[int], width: int, device: Optional[torch.device] = None) -> torch.Tensor:
        """Unpacked state codes ``[B, width, L, H]`` for replay samples ``indices`` (padding = INACTIVE)."""
        L, hp = self.packed.shape[1], self.packed.shape[2]
        rows = torch.as_tensor(list(indices), dtype=torch.long)
        b = rows.numel()
        if b == 0 or self.packed.shape[0] == 0:
            out = torch.full((b, width, L, hp), 121, dtype=torch.uint8)  # 121 = all INACTIVE
        else:
            # One gather of every row's packed tokens (no Python loop over rows); positions past a
            # sample's end read token 0 and are then overwritten with 121 (= all INACTIVE).
            start = self.offsets[rows]
            steps = torch.arange(width)
            valid = steps.unsqueeze(0) < (self.offsets[rows + 1] - start).unsqueeze(1)  # [B, width]
            token = (start.unsqueeze(1) + steps).masked_fill_(~valid, 0)
            out = self.packed.index_select(0, token.reshape(-1)).view(b, width, L, hp)
            out.masked_fill_(~valid.view(b, width, 1, 1), 121)
        if device is not None:
            out = out.to(device, non_blocking=True)
        return unpack_trits(out, self.hidden_size)

    def nbytes(self) -> int:
        return int(self.packed.numel() + 4 * 4 * self.mu.numel() + 8 * self.offsets.numel())

    @staticmethod
    def format_nbytes(num_samples: int, num_tokens: int, hidden: int, num_layers: int = 1) -> int:
        """Bytes of the data a cache holds: 2-bit labels + fp32 thresholds (mu, std, pos, neg) + offsets."""
        return num_tokens * num_layers * packed_width(hidden) + 4 * 4 * num_layers * hidden + 8 * (num_samples + 1)

    # -- persistence --------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> None:
        """Write atomically: a temporary sibling folder is filled, fsynced and renamed into place."""
        from safetensors.torch import save_file

        def write(tmp: Path) -> None:
            arr = self.packed.contiguous().numpy()
            with open(tmp / LABELS, "wb") as fh:
                fh.write(arr.tobytes(order="C"))
                fh.flush()
                os.fsync(fh.fileno())
            save_file(
                {"mu": self.mu, "std": self.std, "pos": self.pos, "neg": self.neg, "offsets": self.offsets},
                str(tmp / THRESHOLDS),
            )

        meta = dict(self.meta)
        meta["packed_shape"] = list(self.packed.shape)
        save_folder_atomically(folder, STATE_CACHE, write, meta, (LABELS, THRESHOLDS))

    @classmethod
    def load(cls, folder: str | os.PathLike, verify: bool = True) -> StateCache:
        """Load a cache; detects missing, truncated or corrupted files (size + sha256)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        rebuild = f"Delete {folder} (or point gere_state_cache at a new folder) and the cache is rebuilt from the base model."
        try:
            meta = json.loads((folder / META).read_text())
        except FileNotFoundError:
            raise StateCacheError(f"gere_state_cache={str(folder)!r} has no {META}; it is not a GeRe state cache. {rebuild}") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise StateCacheError(f"gere_state_cache={str(folder)!r}: {META} is corrupted. {rebuild}") from None
        if not isinstance(meta, dict):
            raise StateCacheError(f"gere_state_cache={str(folder)!r}: {META} is corrupted (not a JSON object). {rebuild}")
        if meta.get("format_version") != FORMAT_VERSION:
            raise StateCacheError(
                f"gere_state_cache={str(folder)!r} has format version {meta.get('format_version')}, this gere-plugin "
                f"reads version {FORMAT_VERSION}. {rebuild}"
            )
        files = meta.get("files")
        missing = [k for k in ("packed_shape", "layers", "hidden_size") if k not in meta]
        if missing or not isinstance(files, dict) or set(files) != {LABELS, THRESHOLDS}:
            what = ", ".join(missing) if missing else f"size and sha256 of {LABELS} and {THRESHOLDS}"
            raise StateCacheError(f"gere_state_cache={str(folder)!r}: {META} is incomplete (no {what}). {rebuild}")
        for name, info in files.items():
            p = folder / name
            if not p.exists():
                raise StateCacheError(f"gere_state_cache={str(folder)!r}: {name} is missing. {rebuild}")
            size = p.stat().st_size
            if size != info["size"]:
                raise StateCacheError(
                    f"gere_state_cache={str(folder)!r}: {name} has {size} bytes, expected {info['size']} "
                    f"(truncated or overwritten). {rebuild}"
                )
            if verify and file_sha256(p) != info["sha256"]:
                raise StateCacheError(f"gere_state_cache={str(folder)!r}: {name} fails its checksum (corrupted). {rebuild}")
        try:
            t = load_file(str(folder / THRESHOLDS))
        except Exception as e:
            raise StateCacheError(f"gere_state_cache={str(folder)!r}: {THRESHOLDS} is unreadable ({e}). {rebuild}") from None
        shape = tuple(meta["packed_shape"])
        raw = np.fromfile(folder / LABELS, dtype=np.uint8)
        if raw.size != int(np.prod(shape)):
            raise StateCacheError(f"gere_state_cache={str(folder)!r}: {LABELS} does not have shape {shape}. {rebuild}")
        packed = torch.from_numpy(raw.reshape(shape))
        cache = cls(t["mu"], t["std"], t["pos"], t["neg"], packed, t["offsets"], meta)
        if cache.mu.shape != (len(meta["layers"]), meta["hidden_size"]) or int(cache.offsets[-1]) != shape[0]:
            raise StateCacheError(f"gere_state_cache={str(folder)!r}: thresholds and labels disagree in shape. {rebuild}")
        return cache

    def check_compatible(
        self,
        replay: ReplaySet,
        hidden_size: Optional[int],
        layers: Sequence[int],
        sigma: float,
        where: str,
        fix: Optional[str] = None,
    ) -> None:
        """Raise :class:`StateCacheError` unless this cache was built for this replay set, tokenizer and model.

        ``hidden_size=None`` skips the hidden-size check; ``fix`` replaces the default advice.
        """
        m = self.meta
        rebuild = fix or f"Delete {where} or point gere_state_cache at a new folder to rebuild it for this run."
        if m["tokenizer_fingerprint"] != replay.tokenizer_fingerprint:
            raise StateCacheError(
                f"gere_state_cache={where!r} was built with another tokenizer (fingerprint {m['tokenizer_fingerprint']}, "
                f"this run {replay.tokenizer_fingerprint}). {rebuild}"
            )
        if hidden_size is not None and int(m["hidden_size"]) != int(hidden_size):
            raise StateCacheError(
                f"gere_state_cache={where!r} was built for hidden size {m['hidden_size']}, but the model has "
                f"hidden size {hidden_size}: it belongs to another model family. {rebuild}"
            )
        if m["replay_fingerprint"] != replay.fingerprint:
            raise StateCacheError(
                f"gere_state_cache={where!r} was built on another replay set (gere_replay, gere_replay_size, "
                f"gere_replay_max_length or gere_seed differ). {rebuild}"
            )
        if list(m["layers"]) != list(layers):
            raise StateCacheError(f"gere_state_cache={where!r} holds gere_layers={m['layers']}, this run asks {list(layers)}. {rebuild}")
        if abs(float(m["sigma"]) - float(sigma)) > 1e-12:
            raise StateCacheError(f"gere_state_cache={where!r} holds gere_sigma={m['sigma']}, this run asks {sigma}. {rebuild}")


# ---------------------------------------------------------------------------------------------
# The one owner of the cache folder: reuse, build or refuse, decided before any forward pass
# ---------------------------------------------------------------------------------------------
#: Advice for a cache that does not fit the run (the trainers and Axolotl plugin never replace one).
REPLACE_ADVICE = (
    "Point gere_state_cache at a new folder, or replace this cache explicitly with `gere cache-states ... --force` "
    "or `axolotl gere build-cache CONFIG --force`."
)




def plan_state_cache(
    folder: str | os.PathLike,
    replay: ReplaySet,
    hidden_size: Optional[int],
    layers: Sequence[int],
    sigma: float,
    *,
    force: bool = False,
    fix: Optional[str] = None,
) -> CachePlan:
    """Decide, without running the model, what to do with the cache folder of this run.

    * absent or empty folder: ``build``;
    * a compatible GeRe cache: ``reuse`` (``rebuild`` with ``force``);
    * a damaged GeRe cache, or one of another tokenizer, hidden size, replay set, layers or sigma:
      :class:`StateCacheError` naming ``gere_state_cache`` and the fix (``rebuild`` with ``force``);
    * anything else (a file, user files, a model folder, a cache mixed with other files): always
      :class:`StateCacheError`, with or without ``force``.
    """
    fix = fix or REPLACE_ADVICE

    def load() -> StateCache:
        cache = StateCache.load(folder)
        cache.check_compatible(replay, hidden_size, layers, sigma, str(folder), fix=fix)
        return cache

    return plan_folder(folder, STATE_CACHE, load, force=force)



def ensure_state_cache(
    folder: str | os.PathLike,
    replay: ReplaySet,
    hidden_size: Optional[int],
    layers: Sequence[int],
    sigma: float,
    build: Callable[[], StateCache],
    *,
    force: bool = False,
    save: bool = True,
    fix: Optional[str] = None,
) -> CachePlan:
    """The one way the trainers, ``gere cache-states`` and ``axolotl gere build-cache`` get a cache.

    :func:`plan_state_cache` decides first (no forward pass before it); then ``build()`` runs only
    for ``build`` / ``rebuild``, and the result is saved atomically (``save=False`` on ranks other
    than the main one). Returns the plan with ``cache`` set.
    """
    plan = plan_state_cache(folder, replay, hidden_size, layers, sigma, force=force, fix=fix)
    if plan.action == "reuse":
        assert plan.cache is not None
        logger.info("gere: reusing base-model state cache %s (base model %s)", plan.folder, plan.cache.meta.get("base_model"))
        return plan
    cache = build()
    if hidden_size is not None and cache.hidden_size != int(hidden_size):
        raise StateCacheError(
            f"gere_state_cache={str(plan.folder)!r}: the states have hidden size {cache.hidden_size} but the model "
            f"reports {hidden_size}; check gere_layers."
        )
    plan.cache = cache
    if save:
        if plan.action == "build" and plan.folder.exists() and any(plan.folder.iterdir()):
            # Someone else wrote the folder during the build: decide again (reuse, or refuse), never replace.
            again = plan_state_cache(plan.folder, replay, hidden_size, layers, sigma, fix=fix)
            if again.action == "reuse":
                return again
        cache.save(plan.folder)
        logger.info("gere: %s the base-model state cache %s", "replaced" if plan.action == "rebuild" else "wrote", plan.folder)
    return plan


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def build_state_cache(
    model: torch.nn.Module,
    replay: ReplaySet,
    layers: Sequence[int] = (-1,),
    sigma: float = 1.0,
    batch_size: int = 8,
    pad_token_id: int = 0,
    autocast_dtype: Optional[torch.dtype] = None,
    progress: bool = True,
    extra_meta: Optional[dict] = None,
) -> StateCache:
    """Run the frozen ``model`` over ``replay`` and return thresholds + packed labels.

    One pass: batches are length-sorted to minimise padding; real-token activations of every
    selected layer go to an fp32 buffer (RAM, or a temporary memory-mapped file above 2 GiB) while
    fp64 sums give mu/sigma; labels are computed from the buffer afterwards.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = model_device(model)
    n = len(replay)
    lengths = replay.lengths
    offsets = np.zeros(n + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths)
    total = int(offsets[-1])
    order = np.argsort(-lengths, kind="stable")
    L = len(layers)
    buf: Optional[np.ndarray] = None
    tmpfile: Optional[str] = None
    s1 = s2 = None
    hidden = None
    t0 = time.perf_counter()
    bar = tqdm(total=total, unit="tok", desc="gere: base-model states", disable=not progress)
    try:
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size].tolist()
            batch = replay.collate(idx, pad_token_id, device)
            ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
            with ctx:
                _, hs = forward_hidden(model, batch["input_ids"], batch["attention_mask"], layers, need_logits=False)
            h = torch.stack([x.float() for x in hs], dim=2)  # [B, T, L, H]
            if buf is None:
                hidden = h.shape[-1]
                nbytes = total * L * hidden * 4
                if nbytes > 2 * 1024**3:
                    import tempfile

                    fd, tmpfile = tempfile.mkstemp(prefix="gere-states-", suffix=".f32")
                    os.close(fd)
                    buf = np.memmap(tmpfile, dtype=np.float32, mode="w+", shape=(total, L, hidden))
                else:
                    buf = np.empty((total, L, hidden), dtype=np.float32)
                s1 = torch.zeros(L, hidden, dtype=torch.float64, device=device)
                s2 = torch.zeros(L, hidden, dtype=torch.float64, device=device)
            mask = batch["attention_mask"].bool()
            real = h[mask]  # [tokens, L, H]
            s1 += real.sum(0, dtype=torch.float64)
            s2 += real.double().pow(2).sum(0)
            # Right padding: row j's real tokens come first, and h[mask] lists them row by row, so
            # one fancy-index assignment puts the whole batch at its cache offsets (no per-row loop).
            dest = (offsets[idx][:, None] + np.arange(mask.shape[1]))[mask.cpu().numpy()]
            buf[dest] = real.cpu().numpy()
            bar.update(int(mask.sum()))
        bar.close()
        assert buf is not None and s1 is not None and s2 is not None and hidden is not None
        mu = s1 / total
        var = (s2 / total - mu.pow(2)).clamp_min(0)
        std = var.sqrt()
        mu32, std32 = mu.float().cpu(), std.float().cpu()
        pos = mu32 + sigma * std32
        neg = mu32 - sigma * std32
        hp = packed_width(hidden)
        packed = torch.empty((total, L, hp), dtype=torch.uint8)
        chunk = max(1, (64 * 1024**2) // (L * hidden * 4))
        counts = torch.zeros(3, dtype=torch.float64)
        for a in range(0, total, chunk):
            h = torch.from_numpy(np.asarray(buf[a : a + chunk]))
            codes = label_states(h, pos, neg)
            counts += torch.bincount(codes.flatten().long(), minlength=3).double()
            packed[a : a + chunk] = pack_trits(codes)
        seconds = time.perf_counter() - t0
    finally:
        bar.close()
        if tmpfile is not None:
            del buf
            with contextlib.suppress(OSError):
                os.remove(tmpfile)
        model.train(was_training)
    frac = (counts / counts.sum()).tolist()
    cfg = getattr(model, "config", None)
    meta = {
        "format_version": FORMAT_VERSION,
        "replay_fingerprint": replay.fingerprint,
        "tokenizer_fingerprint": replay.tokenizer_fingerprint,
        "num_samples": n,
        "total_tokens": total,
        "max_length": replay.max_length,
        "hidden_size": hidden,
        "layers": list(layers),
        "sigma": float(sigma),
        "model_type": getattr(cfg, "model_type", None),
        "base_model": getattr(cfg, "_name_or_path", None),
        "state_fractions": {"neg": frac[0], "inactive": frac[1], "pos": frac[2]},
        "build_seconds": seconds,
        "build_tokens_per_second": total / max(seconds, 1e-9),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    meta.update(extra_meta or {})
    logger.info("gere: built base-model states for %d samples / %d tokens in %.1fs", n, total, seconds)
    return StateCache(mu32, std32, pos, neg, packed, torch.from_numpy(offsets), meta)

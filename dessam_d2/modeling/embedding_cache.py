"""On-disk cache of SAM image embeddings, for a frozen encoder.

The encoder is frozen and training uses no augmentation by default, so an image's embedding is
the same every epoch, in evaluation and in prediction: it is computed once (11 s for ViT-B at
1024^2 on a 2-core CPU) and read back (milliseconds) afterwards.

An entry's key hashes everything the embedding depends on: the bytes of the image fed to the
encoder (after resizing and any flip, so every flip gets its own entry), its shape, the
transform's name, the input size, the storage dtype, the dtype the encoder computed in (float32
and bfloat16 embeddings differ) and a fingerprint of the encoder's weights and preprocessing
(``module_fingerprint``). Change any of them and the key changes: stale
entries are never read, only evicted when the cache is over its size cap (least recently used
first).

Several processes may read and write one directory at once: an entry is written to a temporary
file in its final directory and moved into place with ``os.replace`` (atomic on POSIX), so a
reader sees either nothing or a whole file; a file that cannot be read or does not hold what
its name promises counts as a miss, is recomputed and rewritten.
"""

import hashlib
import logging
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import ConfigError
from ..utils.hashing import module_fingerprint, tensor_digest
from ..utils.io import TEMP_SUFFIX, atomic_open

logger = logging.getLogger(__name__)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_SUFFIX = ".pt"
# A temporary file older than this is left over from a killed writer.
_STALE_TMP_SECONDS = 3600.0


def weights_state(module: nn.Module) -> Tuple:
    """Cheap identity of a module's weights: where each tensor lives and its version counter.

    Loading a checkpoint (``copy_``), an optimizer step or ``.to()`` changes it, so a fingerprint
    computed for one state is recomputed when the weights change.
    """
    return tuple((t.data_ptr(), t._version) for t in module.parameters()) + tuple(
        (t.data_ptr(), t._version) for t in module.buffers()
    )


def encoder_fingerprint(
    encoder: nn.Module, pixel_mean: torch.Tensor, pixel_std: torch.Tensor, image_size: int
) -> str:
    """Hash of an encoder's weights and of the preprocessing in front of it (the normalisation
    and the input size): what an embedding depends on besides the image."""
    extra = [pixel_mean.reshape(-1), pixel_std.reshape(-1), torch.tensor(image_size)]
    return module_fingerprint(encoder, extra)


class EmbeddingCache:
    """A directory of ``<key[:2]>/<key>.pt`` files, each {"key": str, "embedding": C x h x w}.

    ``get``/``put`` count hits, misses and writes; ``stats()`` reports them with the cache's
    size, which ``put`` keeps under ``max_gb`` by evicting the least recently used entries
    (a hit refreshes an entry's modification time).
    """

    def __init__(self, cache_dir: str, dtype: str = "float16", max_gb: float = 20.0):
        if dtype not in _DTYPES:
            raise ConfigError(f"embedding cache dtype {dtype!r}: use one of {sorted(_DTYPES)}")
        self.dir = os.path.abspath(os.path.expanduser(cache_dir))
        self.dtype_name = dtype
        self.dtype = _DTYPES[dtype]
        self.max_bytes = int(max_gb * 1024**3)
        os.makedirs(self.dir, exist_ok=True)
        self.hits = self.misses = self.writes = self.evictions = self.bad_entries = 0
        entries = self._entries()
        self._size = sum(size for _, size, _ in entries)
        self._count = len(entries)
        logger.info(
            f"Embedding cache {self.dir}: {len(entries)} entries, {self._size / 1024**3:.2f} GB "
            f"of {max_gb:g} GB, stored as {dtype}"
        )

    def key(
        self,
        image: torch.Tensor,
        transform: str,
        input_size: int,
        fingerprint: str,
        encoder_dtype: torch.dtype = torch.float32,
    ) -> str:
        """The entry name of one image (as fed to the encoder, before normalisation) encoded in
        ``encoder_dtype``."""
        h = hashlib.blake2b(digest_size=20)
        fields = [fingerprint, input_size, transform, self.dtype_name, encoder_dtype, ""]
        h.update("|".join(str(f) for f in fields).encode())
        return tensor_digest(image, h).hexdigest()

    def path(self, key: str) -> str:
        return os.path.join(self.dir, key[:2], key + _SUFFIX)

    def get(self, key: str, shape: Optional[Sequence[int]] = None) -> Optional[torch.Tensor]:
        """The stored embedding (in the storage dtype, on the CPU) or None."""
        path = self.path(key)
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            self.misses += 1
            return None
        except Exception:  # truncated or foreign file: recompute and overwrite it
            entry = None
        emb = entry.get("embedding") if isinstance(entry, dict) else None
        if (
            not isinstance(emb, torch.Tensor)
            or entry.get("key") != key
            or emb.dtype != self.dtype
            or (shape is not None and tuple(emb.shape) != tuple(shape))
        ):
            self.bad_entries += 1
            self.misses += 1
            logger.warning(f"Embedding cache: ignoring unreadable or mismatched entry {path}")
            return None
        self.hits += 1
        try:
            os.utime(path)  # least recently used eviction reads modification times
        except OSError:
            pass
        return emb

    def put(self, key: str, embedding: torch.Tensor) -> torch.Tensor:
        """Store one embedding (C x h x w); returns it as stored (rounded to the storage dtype),
        so a result never depends on whether the embedding came from the cache."""
        stored = embedding.detach().to("cpu", self.dtype).contiguous()
        path = self.path(key)
        with atomic_open(path) as f:
            torch.save({"key": key, "embedding": stored}, f)
        self.writes += 1
        self._count += 1  # an overwritten entry is counted twice until the next rescan
        self._size += os.path.getsize(path)
        if self._size > self.max_bytes:
            self.evict()
        return stored

    def _entries(self) -> list:
        """[(path, size, mtime)] of the entries; removes temporary files of killed writers."""
        out = []
        now = time.time()
        for sub in os.scandir(self.dir):
            if not sub.is_dir():
                continue
            for e in os.scandir(sub.path):
                try:
                    st = e.stat()
                except FileNotFoundError:  # evicted or replaced by another process meanwhile
                    continue
                if e.name.endswith(_SUFFIX):
                    out.append((e.path, st.st_size, st.st_mtime))
                elif e.name.endswith(TEMP_SUFFIX) and now - st.st_mtime > _STALE_TMP_SECONDS:
                    try:
                        os.remove(e.path)
                    except OSError:
                        pass
        return out

    def evict(self, target_fraction: float = 0.9) -> None:
        """Delete least recently used entries until the cache is below target_fraction of its
        cap (a margin, so that eviction does not rescan the directory on every write)."""
        entries = sorted(self._entries(), key=lambda e: e[2])
        size, count = sum(s for _, s, _ in entries), len(entries)
        for path, s, _ in entries:
            if size <= target_fraction * self.max_bytes:
                break
            try:
                os.remove(path)
                self.evictions += 1
            except FileNotFoundError:  # another process evicted it first
                pass
            size, count = size - s, count - 1
        self._size, self._count = size, count

    def stats(self, rescan: bool = True) -> Dict[str, float]:
        """Hits, misses, writes, evictions, bad entries and the size of the cache (rescanned from
        disk, or as this process last saw it)."""
        if rescan:
            entries = self._entries()
            self._size = sum(s for _, s, _ in entries)
            self._count = len(entries)
        lookups = self.hits + self.misses
        return {
            "dir": self.dir,
            "dtype": self.dtype_name,
            "entries": self._count,
            "size_gb": self._size / 1024**3,
            "max_gb": self.max_bytes / 1024**3,
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hits / lookups if lookups else 0.0,
            "writes": self.writes,
            "evictions": self.evictions,
            "bad_entries": self.bad_entries,
        }

    def summary(self, rescan: bool = True) -> str:
        """One line of ``stats()`` for the log."""
        s = self.stats(rescan)
        return (
            f"Embedding cache {s['dir']}: {s['hits']} hits, {s['misses']} misses "
            f"({100 * s['hit_rate']:.0f}% hit rate), {s['writes']} writes, {s['evictions']} "
            f"evictions, {s['entries']} entries, {s['size_gb']:.2f} / {s['max_gb']:g} GB"
        )


def cached_encode(
    cache: EmbeddingCache,
    batched_inputs: List[Dict],
    images: torch.Tensor,
    encode: Callable[[torch.Tensor], torch.Tensor],
    fingerprint: str,
    image_size: int,
    shape: Sequence[int],
    encoder_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """B x C x h x w embeddings of ``images`` (the padded, normalised B x 3 x S x S encoder input
    of ``batched_inputs``): read from ``cache`` where the same input image (its "image" and
    "sam_transform") went through an encoder of the same ``fingerprint`` in the same dtype,
    computed by ``encode`` and stored otherwise. Every model that feeds the same encoder the
    same way shares the entries (DES-SAM's training, evaluation and prediction, and the demo's
    reference, which builds the same fingerprint)."""
    keys = [
        cache.key(x["image"], x.get("sam_transform", ""), image_size, fingerprint, encoder_dtype)
        for x in batched_inputs
    ]
    found = [cache.get(k, shape) for k in keys]
    missing = [i for i, f in enumerate(found) if f is None]
    if missing:
        fresh = encode(images[missing])
        for i, emb in zip(missing, fresh):
            # What was stored, rounded to the cache's dtype: results do not depend on whether
            # an image was a hit or a miss.
            found[i] = cache.put(keys[i], emb)
    return torch.stack(found).to(images.device, torch.float32)

"""The quantized-experts cache: quantize a checkpoint's experts once, keep the result on disk as a
safetensors file, and read it straight into the host store on the next load.

One file per (checkpoint folder, format), under `MOE_LOCAL_CACHE` or `~/.cache/moe-local/`: a tensor
`experts.{layer}` of uint8 [n_experts, expert_bytes] per layer, exactly the store's buffers, and in the
header's metadata the checkpoint's fingerprint (its files' names, sizes and modification times), the
format and a CRC-32 per expert. A file whose fingerprint or layout differs is stale, one whose size or
checksums are wrong is corrupt: either is rebuilt, never used. The file is written beside its final
name and renamed into place only when complete, so an interrupted write leaves nothing that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from moe_local.checkpoint import Checkpoint
from moe_local.experts.store import ExpertStore

VERSION = 1
Progress = Callable[[int, int], None]


class StaleOrCorrupt(Exception):
    """The cache file cannot be used; the message says why."""


def cache_root() -> Path:
    return Path(os.environ.get("MOE_LOCAL_CACHE") or Path.home() / ".cache" / "moe-local")


def cache_path(ckpt: Checkpoint, store: ExpertStore, root: Path | None = None) -> Path:
    folder = ckpt.folder.resolve()
    tag = hashlib.sha256(str(folder).encode()).hexdigest()[:12]
    return (root or cache_root()) / f"{folder.name}-{tag}-{store.format.key}.safetensors"


def identity(ckpt: Checkpoint, store: ExpertStore) -> dict:
    """What the file must have been built from: equal dicts, usable file."""
    ident = {
        "moe_local_cache": VERSION,
        "format": store.format.key,
        "expert_bytes": store.expert_bytes,
        "layers": store.cfg.n_moe_layers,
        "experts": store.cfg.n_experts,
        "source": ckpt.fingerprint(),
    }
    if store.format.key.endswith("-cuda"):  # the tiled int4 layout is private to torch's kernel
        ident["torch"] = ".".join(torch.__version__.split(".")[:2])
    return ident


def header(store: ExpertStore, ident: dict, crcs: list[int]) -> bytes:
    layer_bytes = store.cfg.n_experts * store.expert_bytes
    tensors = {
        f"experts.{layer}": {
            "dtype": "U8",
            "shape": [store.cfg.n_experts, store.expert_bytes],
            "data_offsets": [layer * layer_bytes, (layer + 1) * layer_bytes],
        }
        for layer in range(store.cfg.n_moe_layers)
    }
    meta = {"moe_local": json.dumps(ident, sort_keys=True), "crc32": ",".join(f"{c:08x}" for c in crcs)}
    raw = json.dumps({"__metadata__": meta, **tensors}).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-aligned, as safetensors files do
    return struct.pack("<Q", len(raw)) + raw


def read_into(path: Path, ckpt: Checkpoint, store: ExpertStore, progress: Progress | None) -> None:
    """Fill the store from the file, or raise StaleOrCorrupt."""
    ident = identity(ckpt, store)
    layout = json.loads(header(store, ident, [0] * store.count)[8:])
    layout.pop("__metadata__")
    with open(path, "rb", buffering=0) as f:
        try:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 1 << 24:
                raise StaleOrCorrupt("its header length is implausible")
            found = json.loads(f.read(n))
            meta = found.pop("__metadata__")
            if json.loads(meta["moe_local"]) != ident:
                raise StaleOrCorrupt("it was built from other files or for another format")
            crcs = [int(c, 16) for c in meta["crc32"].split(",")]
        except (struct.error, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise StaleOrCorrupt("its header is unreadable") from None
        if len(crcs) != store.count or found != layout:
            raise StaleOrCorrupt("its tensors are not laid out as this model's experts")
        if os.fstat(f.fileno()).st_size != 8 + n + store.total_bytes:
            raise StaleOrCorrupt("it is truncated or has trailing data")

        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # zlib releases the GIL
            checks = []

            def read(key: tuple[int, int], buffer: torch.Tensor) -> None:
                view = memoryview(buffer.numpy())
                if f.readinto(view) != len(view):
                    raise StaleOrCorrupt("it ends early")
                checks.append((key, pool.submit(zlib.crc32, view)))

            store.fill(read, progress)
            for (key, check), crc in zip(checks, crcs):
                if check.result() != crc:
                    raise StaleOrCorrupt(f"the checksum of layer {key[0]} expert {key[1]} does not match")


def write_while_filling(path: Path, ckpt: Checkpoint, store: ExpertStore, device: torch.device, progress: Progress | None) -> None:
    """Quantize every expert into the store and stream each to the cache file as it is done. A failure
    to write (disk full, no permission) costs only the cache: the load goes on, with one warning."""
    pack, crcs = store.packer(ckpt.expert, device), []
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    f = None

    def give_up(e: OSError) -> None:
        nonlocal f
        warnings.warn(f"could not write the quantized cache {path} ({e}); the next load will quantize again")
        if f is not None:
            f.close()
            tmp.unlink(missing_ok=True)
        f = None

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(tmp, "wb")
        f.write(header(store, identity(ckpt, store), [0] * store.count))  # checksums filled in at the end
    except OSError as e:
        give_up(e)

    def write(key: tuple[int, int], buffer: torch.Tensor) -> None:
        pack(key, buffer)
        if f is not None:
            view = memoryview(buffer.numpy())
            crcs.append(zlib.crc32(view))
            try:
                f.write(view)
            except OSError as e:
                give_up(e)

    try:
        store.fill(write, progress)
    except BaseException:
        if f is not None:
            f.close()
            tmp.unlink(missing_ok=True)
        raise
    if f is None:
        return
    try:
        f.seek(0)
        f.write(header(store, identity(ckpt, store), crcs))
        f.close()
        os.replace(tmp, path)
    except OSError as e:
        give_up(e)


def fill_quantized(ckpt: Checkpoint, store: ExpertStore, device: torch.device, progress: Progress | None = None, root: Path | None = None) -> str:
    """Fill the store with the quantized experts, from the cache when it holds a valid file, else by
    quantizing (and caching the result). Returns a line saying which."""
    path = cache_path(ckpt, store, root)
    if path.is_file():
        try:
            read_into(path, ckpt, store, progress)
            return f"read the {store.format.key} experts from the cache {path}"
        except (StaleOrCorrupt, OSError) as e:
            warnings.warn(f"the quantized cache {path} cannot be used ({e}); quantizing again")
    write_while_filling(path, ckpt, store, device, progress)
    return f"quantized the experts to {store.format.key} and cached them in {path}" if path.is_file() else f"quantized the experts to {store.format.key}"

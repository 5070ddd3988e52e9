"""The quantized-experts cache: quantize a checkpoint's experts once, keep the result on disk as a
safetensors file, and read it straight into the host store on the next load.

One file per (checkpoint contents, format), under `MOE_LOCAL_CACHE` or `~/.cache/moe-local/`, named by
the contents alone (`FINGERPRINT-FORMAT.safetensors`): a tensor `experts.{layer}` of uint8 [n_experts,
expert_bytes] per layer, exactly the store's buffers, and in the header's metadata the checkpoint's content
fingerprint (`content_fingerprint`: config.json, each shard's header and sampled blocks of its data; so a
moved or renamed folder reuses its file and weights replaced in place do not), the format, a CRC-32 per
expert and the folder it was built from. A file whose fingerprint or layout differs is stale, one whose
size or checksums are wrong is corrupt: either is rebuilt, never used; once a folder's new weights have
their file, the file built from its earlier weights in the same format is removed, with a warning. The
file is written beside its final name (`NAME.PID.tmp`) and renamed into place only when complete, so an
interrupted write leaves nothing that looks valid; while one process builds an entry it holds
`NAME.lock` (flock), so a second one waits and reads the result, and a temporary file whose entry nobody
holds is an abandoned one, removed by the next load. A lock file is removed by its holder when it lets go
(`entry_lock`), so none stays beside the entries.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import struct
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from moe_local.budget import format_bytes
from moe_local.checkpoint import Checkpoint
from moe_local.experts.store import ExpertStore
from moe_local.paths import cache_root
from moe_local.weights.gguf_model import GgufModel

VERSION = 2  # 2: keyed by content_fingerprint instead of the folder's path and its files' mtimes
SAMPLES_PER_SHARD = 16  # blocks of each shard's data that the fingerprint reads, evenly spread, plus its end
SAMPLE_BYTES = 1 << 16
Progress = Callable[[int, int], None]


class StaleOrCorrupt(Exception):
    """The cache file cannot be used; the message says why."""


def content_fingerprint(ckpt: Checkpoint) -> str:
    """A hash of what the experts are built from: config.json, and per shard its name, size, safetensors
    header and SAMPLES_PER_SHARD blocks of SAMPLE_BYTES spread over its data and its last block. About a
    MiB read per shard whatever its size; moving or touching the files does not change it, replacing the
    weights does (a change that misses every sampled block goes unseen: the price of not hashing 90 GB)."""
    if isinstance(ckpt, GgufModel):  # a GGUF model says its own
        return ckpt.content_fingerprint()
    digest = hashlib.sha256((ckpt.folder / "config.json").read_bytes())
    for shard in sorted(dict.fromkeys(info.shard for info in ckpt.tensors.values())):
        with open(shard, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            (header_bytes,) = struct.unpack("<Q", f.read(8))
            digest.update(f"{shard.name}\0{size}\0".encode())
            digest.update(f.read(header_bytes))
            start = 8 + header_bytes
            for i in range(SAMPLES_PER_SHARD):
                f.seek(start + (size - start) * i // SAMPLES_PER_SHARD)
                digest.update(f.read(SAMPLE_BYTES))
            f.seek(max(start, size - SAMPLE_BYTES))
            digest.update(f.read())
    return digest.hexdigest()


def cache_path(ckpt: Checkpoint, source: str, store: ExpertStore, root: Path | None = None) -> Path:
    """Named by the content fingerprint and the format alone, so that a renamed folder finds its file (the
    folder it was built from is in the metadata, which `moe-local cache list` shows)."""
    return (root or cache_root()) / f"{source[:16]}-{store.format.key}.safetensors"


def source_path(ckpt: Checkpoint) -> Path:
    """Where the experts come from: the model's folder, or a GGUF model's (first) file, since one folder often
    holds several quantizations of a model, each a model of its own here."""
    return (ckpt.files[0] if isinstance(ckpt, GgufModel) else ckpt.folder).resolve()


def model_identity(folder: Path | str) -> Path:
    """What counts as one model whose weights may change: its folder, or for a Hugging Face hub snapshot
    (`models--ORG--NAME/snapshots/REVISION`) the repository, so that a new revision replaces the old one's file."""
    folder = Path(folder).resolve()
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent
    return folder


def identity(source: str, store: ExpertStore) -> dict:
    """What the file must have been built from: equal dicts, usable file."""
    ident = {
        "moe_local_cache": VERSION,
        "format": store.format.key,
        "expert_bytes": store.expert_bytes,
        "layers": store.cfg.n_moe_layers,
        "experts": store.cfg.n_experts,
        "source": source,
    }
    if store.format.key.endswith("-cuda"):  # the tiled int4 layout is private to torch's kernel
        ident["torch"] = ".".join(torch.__version__.split(".")[:2])
    return ident


def header(store: ExpertStore, ident: dict, crcs: list[int], model: str = "") -> bytes:
    layer_bytes = store.cfg.n_experts * store.expert_bytes
    tensors = {
        f"experts.{layer}": {
            "dtype": "U8",
            "shape": [store.cfg.n_experts, store.expert_bytes],
            "data_offsets": [layer * layer_bytes, (layer + 1) * layer_bytes],
        }
        for layer in range(store.cfg.n_moe_layers)
    }
    # "model": the folder it was built from, for `moe-local cache list` only (not part of the identity)
    meta = {"moe_local": json.dumps(ident, sort_keys=True), "crc32": ",".join(f"{c:08x}" for c in crcs), "model": model}
    raw = json.dumps({"__metadata__": meta, **tensors}).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-aligned, as safetensors files do
    return struct.pack("<Q", len(raw)) + raw


def read_into(path: Path, ident: dict, store: ExpertStore, progress: Progress | None) -> None:
    """Fill the store from the file, or raise StaleOrCorrupt."""
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


def write_while_filling(path: Path, ident: dict, ckpt: Checkpoint, store: ExpertStore, device: torch.device, progress: Progress | None) -> None:
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
        f.write(header(store, ident, [0] * store.count, str(source_path(ckpt))))  # checksums filled in at the end
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
        f.write(header(store, ident, crcs, str(source_path(ckpt))))
        f.close()
        os.replace(tmp, path)
    except OSError as e:
        give_up(e)


def lock_path(entry: Path) -> Path:
    return entry.with_name(entry.name + ".lock")


@contextmanager
def entry_lock(path: Path, wait: bool = True) -> Iterator[bool]:
    """Hold the lock of the cache entry `path` (an flock on `NAME.lock`, released when the process ends,
    however it ends); yields whether it is held. `wait=False` gives up at once when another process holds
    it. With an unwritable cache folder there is nothing to share and no lock: it yields True.

    The holder removes the lock file before it lets go, so that none stays behind. A process that opened
    the file before that and then got the flock holds a lock on a file that is no longer the lock: it sees
    that the name now leads elsewhere (or nowhere) and starts again, so two processes never both hold it."""
    lock, warned = lock_path(path), False
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            yield True
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                os.close(fd)
                yield False
                return
            if not warned:
                warnings.warn(f"another moe-local process is quantizing these experts into {path}; waiting for it to finish, then reading what it wrote")
                warned = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        if same_file(fd, lock):
            break
        os.close(fd)  # the holder before us removed this one: lock the file now at that name
    try:
        yield True
    finally:
        try:
            lock.unlink()  # while still held: a waiter on this file will find it gone and start again
        except OSError:
            pass  # a read-only folder, or `cache clear` took it: the flock still ends below
        os.close(fd)


def same_file(fd: int, path: Path) -> bool:
    try:
        st, held = path.stat(), os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def remove_abandoned_files(root: Path) -> None:
    """Remove the temporary files of writers that were killed (tens of GB for a large model): those of an
    entry whose lock nobody holds, since a live writer holds it for as long as it writes. Lock files nobody
    holds go too (releasing one removes it; earlier releases left one beside every entry)."""
    for lock in root.glob("*.lock"):
        with entry_lock(lock.with_name(lock.name.removesuffix(".lock")), wait=False):
            pass
    freed = 0
    for tmp in root.glob("*.tmp"):
        entry = tmp.with_name(tmp.name.rsplit(".", 2)[0])  # NAME.PID.tmp -> NAME
        with entry_lock(entry, wait=False) as free:
            if free:
                try:
                    freed += tmp.stat().st_size
                    tmp.unlink()
                except OSError:
                    pass  # another process removed it first, or the folder is read-only: not ours to fix
    if freed:
        warnings.warn(f"removed {format_bytes(freed)} of temporary files that an interrupted quantization left in {root}")


def fill_quantized(ckpt: Checkpoint, store: ExpertStore, device: torch.device, progress: Progress | None = None, root: Path | None = None) -> str:
    """Fill the store with the quantized experts, from the cache when it holds a valid file, else by
    quantizing (and caching the result). Returns a line saying which."""
    root = root or cache_root()
    if root.is_dir():
        remove_abandoned_files(root)
    source = content_fingerprint(ckpt)
    path, ident = cache_path(ckpt, source, store, root), identity(source, store)
    note = read_or_quantize(path, ident, ckpt, store, device, progress)
    if path.is_file():
        remove_stale(path, source_path(ckpt), store.format.key)
    return note


def read_or_quantize(path: Path, ident: dict, ckpt: Checkpoint, store: ExpertStore, device: torch.device, progress: Progress | None) -> str:
    unusable = None  # (inode, mtime) of a file found broken, so that one rebuilt meanwhile is tried again
    if not path.is_file():
        adopt_older_name(path)
    if path.is_file():
        try:
            read_into(path, ident, store, progress)
            return f"read the {store.format.key} experts from the cache {path}"
        except (StaleOrCorrupt, OSError) as e:
            warnings.warn(f"the quantized cache {path} cannot be used ({e}); quantizing again")
            unusable = stat_key(path)
    with entry_lock(path):
        if path.is_file() and stat_key(path) != unusable:  # another process wrote it while we waited
            try:
                read_into(path, ident, store, progress)
                return f"read the {store.format.key} experts from the cache {path}"
            except (StaleOrCorrupt, OSError) as e:
                warnings.warn(f"the quantized cache {path} cannot be used ({e}); quantizing again")
        write_while_filling(path, ident, ckpt, store, device, progress)
    return f"quantized the experts to {store.format.key} and cached them in {path}" if path.is_file() else f"quantized the experts to {store.format.key}"


def adopt_older_name(path: Path) -> None:
    """Earlier releases put the folder's name before the fingerprint (`FOLDER-FINGERPRINT-FORMAT`): such a
    file holds these experts, so it takes the new name instead of being built again (read_into checks it
    as any other)."""
    older = next(iter(sorted(path.parent.glob(f"*-{path.name}"))), None)
    if older is None:
        return
    with entry_lock(path, wait=False) as free:
        if free and not path.exists():
            try:
                os.replace(older, path)
            except OSError:
                pass  # removed meanwhile, or a read-only folder: it is built again


def remove_stale(path: Path, folder: Path, format_key: str) -> None:
    """Remove the files of `format_key` built from `folder` (or its hub repository) when its weights were
    others: `path` now holds its experts, and nothing else would ever read those (a copy of the old weights
    elsewhere would quantize them again). Each with a warning that says what it held."""
    model = model_identity(folder)
    for other in sorted(path.parent.glob("*.safetensors")):
        entry = describe(other)
        if other == path or entry["format"] != format_key or not entry["model"] or model_identity(entry["model"]) != model:
            continue
        with entry_lock(other, wait=False) as free:
            if not free:
                continue  # a process is building it: not stale to that one
            try:
                other.unlink()
            except OSError:
                continue
        warnings.warn(f"removed the quantized cache {other.name} ({format_bytes(entry['bytes'])}): it held the experts of an "
                      f"earlier version of {folder}'s weights, replaced by {path.name}")


def stat_key(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def entries(root: Path | None = None) -> list[dict]:
    """What `moe-local cache list` shows: each cached file, its size, format and the model it came from."""
    root = root or cache_root()
    return [describe(path) for path in sorted(root.glob("*.safetensors"))] if root.is_dir() else []


def describe(path: Path) -> dict:
    """A cached file's name, size, format and the folder it was built from (None where unreadable)."""
    entry = {"file": path.name, "bytes": 0, "format": None, "model": None}
    try:
        entry["bytes"] = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            meta = json.loads(f.read(min(n, 1 << 24)))["__metadata__"]
        entry.update(format=json.loads(meta["moe_local"])["format"], model=meta.get("model") or None)
    except (OSError, struct.error, ValueError, KeyError, TypeError):
        pass  # damaged or foreign: listed (and cleared) all the same
    return entry


def clear(root: Path | None = None) -> tuple[int, int, list[str]]:
    """Remove every cached file and abandoned temporary file (not the chats saved beside them). Returns
    (files removed, bytes freed, the entries skipped because a process is building them)."""
    root = root or cache_root()
    removed = freed = 0
    busy = []
    for path in sorted(root.glob("*.safetensors")) if root.is_dir() else []:
        with entry_lock(path, wait=False) as free:
            if not free:
                busy.append(path.name)
                continue
            freed += path.stat().st_size
            path.unlink()
            removed += 1
    for tmp in root.glob("*.tmp") if root.is_dir() else []:
        entry = tmp.with_name(tmp.name.rsplit(".", 2)[0])
        with entry_lock(entry, wait=False) as free:
            if free:
                freed += tmp.stat().st_size
                tmp.unlink()
                removed += 1
    return removed, freed, busy

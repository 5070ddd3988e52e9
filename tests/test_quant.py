"""Quantized experts: round-trip bounds per format through the real kernels, invariance to the budget,
fidelity against the unquantized model, the on-disk cache's hit/stale/corrupt paths, and peak RAM while
quantizing."""

from __future__ import annotations

import fcntl
import inspect
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import pytest
import torch

import moe_local
from moe_local.budget import format_bytes
from moe_local.checkpoint import open_checkpoint
from moe_local.cli import tensor_formats
from moe_local.errors import BudgetError, ConfigError
from moe_local.experts import qcache
from moe_local.experts.formats import choose_format, make_format
from moe_local.generate import SamplingParams
from moe_local.int4 import Int4Linear
from moe_local.int8 import Int8Linear
from moe_local.model import DenseMLP, MoE
from conftest import build_mixtral, moe_local_cli
from families import build_family
from test_runtime import small_config

GREEDY = SamplingParams(temperature=0)
DEMO = Path(moe_local.__file__).parent / "demo"


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_dequantized_weights_are_within_half_a_step_of_the_originals(name, device):
    """Run each packed matrix through the device's kernel on the identity: what comes out is the weight
    the kernel reconstructs, which must be within half a quantization step (plus bf16 rounding) of the
    original, everywhere."""
    cfg = small_config(hidden_size=64, intermediate_size=96)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    fmt = make_format(name, cfg, dtype, device, group_size=32)
    gen = torch.Generator().manual_seed(0)
    w1, w2, w3 = (torch.randn(shape, generator=gen) for shape in cfg.expert_shapes.values())
    buffer = torch.empty(fmt.expert_bytes, dtype=torch.uint8)
    fmt.pack(w1.to(device), w2.to(device), w3.to(device), buffer)
    weights = fmt.unpack(buffer.to(device))
    for part, original in (("gate_up", torch.cat([w1, w3])), ("down", w2)):
        n, k = original.shape
        seen = fmt.linear(torch.eye(k, dtype=dtype, device=device), weights, part).float().T.cpu()  # [N, K]
        if name == "int8":
            step = weights[f"{part}.scale"].float().cpu()[:, None].expand(n, k)
        else:
            step = weights[f"{part}.scale_zero"][..., 0].float().T.cpu().repeat_interleave(32, dim=1)  # [N, K]
        rounding = 2**-8 * original.abs() if (name == "int4" or dtype == torch.bfloat16) else 0
        assert torch.all((seen - original).abs() <= step / 2 + rounding + 1e-6)
        assert (seen - original).abs().mean() < 0.3 * step.mean()  # really quantized to nearest, not clipped


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_quantized_outputs_do_not_depend_on_budget_policy_or_prefetch(tiny, device, name):
    folder, _ = tiny
    ids = [1, 17, 99, 250, 31, 7, 64, 5, 5, 12]
    everything = moe_local.load(folder, device=device, experts_dtype=name, expert_slots=24, prefetch=False)
    want = everything.logits(ids)
    want_tokens = list(everything.generate(ids, 16, GREEDY))
    for options in (dict(expert_slots=2), dict(expert_slots=5, policy="lru", prefetch=False), dict(expert_slots=9)):
        engine = moe_local.load(folder, device=device, experts_dtype=name, **options)
        assert torch.equal(engine.logits(ids), want), options
        assert list(engine.generate(ids, 16, GREEDY)) == want_tokens, options
        assert engine.store.format.key.startswith(name)


QUANTIZED = {"int8": dict(experts_dtype="int8"), "int4": dict(experts_dtype="int4"), "int8 attention": dict(resident_dtype="int8"),
             "int4 attention": dict(resident_dtype="int4")}


def fidelity(names: tuple[str, ...], n_tokens: int = 1000) -> dict[str, dict]:
    """Top-1 agreement and KL(reference || quantized) of each quantization (`QUANTIZED`) against the
    unquantized demo model, over a fixed text (this package's tokenizer source), both computed in fp32 so
    that only the quantization differs. The figures docs/measurements.md records."""
    import moe_local.tokenizer as text_source

    reference = moe_local.load(DEMO, device="cpu", dtype="fp32", experts_dtype="bf16")
    ids = reference.tokenizer.encode(inspect.getsource(text_source))[:n_tokens]
    want = reference.logits(ids).log_softmax(-1)
    out = {}
    for name in names:
        options = {"experts_dtype": "bf16", **QUANTIZED[name]}
        got = moe_local.load(DEMO, device="cpu", dtype="fp32", **options).logits(ids).log_softmax(-1)
        kl = (want.exp() * (want - got)).sum(-1)
        out[name] = {
            "positions": len(ids),
            "top1_agreement": (want.argmax(-1) == got.argmax(-1)).float().mean().item(),
            "kl_mean": kl.mean().item(),
            "kl_p99": kl.quantile(0.99).item(),
        }
    return out


INT4_KL_BOUND = 0.02  # measured on the demo model (docs/measurements.md): experts 0.007-0.008, attention 0.011


def test_int8_keeps_the_top_token_and_int4_stays_within_its_kl_bound():
    figures = fidelity(("int8", "int4", "int8 attention", "int4 attention"))
    assert figures["int8"]["top1_agreement"] >= 0.99, figures
    assert figures["int8 attention"]["top1_agreement"] >= 0.99, figures
    assert figures["int4"]["kl_mean"] <= INT4_KL_BOUND, figures
    assert figures["int4 attention"]["kl_mean"] <= INT4_KL_BOUND, figures
    assert figures["int8"]["kl_mean"] < figures["int4"]["kl_mean"]  # more bits, closer


def test_int8_attention_runs_its_projections_in_int8_and_outputs_do_not_depend_on_the_budget(tiny, device):
    folder, _ = tiny
    ids = [1, 17, 99, 250, 31, 7, 64, 5, 5, 12]
    dense = moe_local.load(folder, device=device, expert_slots=24)
    engine = moe_local.load(folder, device=device, resident_dtype="int8", expert_slots=24)
    attention = engine.model.layers[0].attention
    assert isinstance(attention.wqkv, Int8Linear) and attention.wqkv.weight.dtype == torch.int8
    head = ", lm_head in int8" if device == "cpu" else ""  # where every token reads it
    assert engine.notes[-1] == f"attention weights in int8{head} (--resident-dtype int8)"
    assert isinstance(engine.model.output, Int8Linear) == (device == "cpu")
    assert engine.plan.resident_bytes < dense.plan.resident_bytes
    # within half a quantization step of the float weight, through the device's kernel
    w = dense.model.layers[0].attention.wqkv.weight
    seen = attention.wqkv(torch.eye(w.shape[1], dtype=w.dtype, device=device)).T
    assert torch.all((seen - w).abs() <= attention.wqkv.scale[:, None] / 2 + 1e-6)
    want, got = dense.logits(ids), engine.logits(ids)
    assert (got - want).abs().max() <= 0.05 * want.abs().max() and torch.equal(got.argmax(-1), want.argmax(-1))
    small = moe_local.load(folder, device=device, resident_dtype="int8", expert_slots=3)
    assert torch.equal(small.logits(ids), got)


def test_int4_attention_runs_its_projections_in_int4_and_outputs_do_not_depend_on_the_budget(tiny, device):
    folder, _ = tiny
    ids = [1, 17, 99, 250, 31, 7, 64, 5, 5, 12]
    dense = moe_local.load(folder, device=device, expert_slots=24)
    engine = moe_local.load(folder, device=device, resident_dtype="int4", expert_slots=24)
    attention = engine.model.layers[0].attention
    assert isinstance(attention.wqkv, Int4Linear) and attention.wqkv.group == 64  # the largest of 128, 64, 32 dividing 64
    head = ", lm_head in int8" if device == "cpu" else ""
    assert engine.notes[-1] == f"attention weights in int4{head} (--resident-dtype int4)"
    assert engine.plan.resident_bytes < moe_local.load(folder, device=device, resident_dtype="int8", expert_slots=24).plan.resident_bytes
    # within half a quantization step (plus bf16's rounding, int4's kernels take bf16) of the float weight
    w = dense.model.layers[0].attention.wqkv.weight
    seen = attention.wqkv(torch.eye(w.shape[1], dtype=w.dtype, device=device)).T.float()
    step = attention.wqkv.scale_zero[..., 0].float().T.repeat_interleave(64, dim=1)  # [N, K]
    assert torch.all((seen - w).abs() <= step / 2 + 2**-8 * w.abs() + 1e-6)
    want, got = dense.logits(ids).log_softmax(-1), engine.logits(ids).log_softmax(-1)
    assert (want.exp() * (want - got)).sum(-1).mean() <= 0.05  # 0.022 on this random model (the trained demo: `fidelity`)
    small = moe_local.load(folder, device=device, resident_dtype="int4", expert_slots=3)
    assert torch.equal(small.logits(ids).log_softmax(-1), got)


def test_on_the_cpu_quantized_attention_brings_lm_head_to_int8_but_not_a_tied_one(tmp_path):
    build_mixtral(tmp_path, None, tie_word_embeddings=True)
    engine = moe_local.load(tmp_path, device="cpu", resident_dtype="int8")
    assert not isinstance(engine.model.output, Int8Linear)  # it is the token embeddings' table too
    assert engine.notes[-1] == "attention weights in int8 (--resident-dtype int8)"


# int4's packing needs every K a multiple of 32: MLPs 64 wide. A random Gemma 4 at the default init turns any
# rounding into near-tie flips of its routing (int8 attention alone: KL 0.03 against transformers), so it is drawn
# with smaller weights, whose outputs, like a trained model's, change by what the quantization changes
MLP_FAMILIES = {
    "gemma4": dict(intermediate_size=64, initializer_range=0.02),  # a dense MLP beside the experts in every layer
    "qwen2_moe": dict(shared_expert_intermediate_size=64),  # dense layers, and a shared expert under a sigmoid gate
}
# KL(transformers' fp32 || ours) bounds, measured 0.0008 (int8) and 0.018 (int4) for Gemma 4, 0.0004 and 0.026 for
# Qwen2-MoE; each MLP's own relative error on random inputs, measured up to 0.011 (int8) and 0.16 (int4, groups of 32)
RESIDENT_KL_BOUND = {"int8": 0.005, "int4": 0.05}
MLP_ERROR_BOUND = {"int8": 0.02, "int4": 0.2}


@pytest.fixture(scope="module", params=list(MLP_FAMILIES))
def mlp_family(request, tmp_path_factory):
    """A family with resident MLPs, saved, and transformers' fp32 logits on a prompt."""
    folder = tmp_path_factory.mktemp(request.param)
    reference = build_family(request.param, folder, **MLP_FAMILIES[request.param])
    ids = [1] + torch.randint(3, 320, (23,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0]
    return folder, ids, want


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_resident_dtype_quantizes_the_dense_mlps_and_shared_experts_too(mlp_family, dtype):
    folder, ids, want = mlp_family
    exact = moe_local.load(folder, device="cpu", dtype="fp32")
    engine = moe_local.load(folder, device="cpu", dtype="fp32", resident_dtype=dtype)
    kind = Int8Linear if dtype == "int8" else Int4Linear
    mlps, floats = ([m for m in e.model.modules() if isinstance(m, DenseMLP)] for e in (engine, exact))
    assert mlps and all(isinstance(m.w13, kind) and isinstance(m.w2, kind) for m in mlps)
    assert all(type(m.w13) is torch.nn.Linear for m in floats)  # auto keeps them exact
    # routers, norms and the shared expert's one-row gate stay in full precision
    gates = [m.shared_gate for m in engine.model.modules() if isinstance(m, MoE) and m.shared_gate is not None]
    assert len(gates) == engine.cfg.n_moe_layers * engine.cfg.shared_gate  # Qwen2-MoE's, one a MoE layer
    assert all(type(g) is torch.nn.Linear and g.weight.dtype == torch.float32 for g in gates)
    assert all(p.dtype == torch.float32 for name, p in engine.model.named_parameters() if name.endswith(("router.weight", "norm.weight")))
    assert engine.notes[-1].startswith(f"attention and MLP weights in {dtype}")
    assert tensor_formats(open_checkpoint(folder))["other"]["at_load"] == "as stored (the dense and shared MLPs: or int8, int4 under --resident-dtype)"
    # plan counts what the model holds (a tied table once)
    held = {t.data_ptr(): t.nbytes for t in engine.model.state_dict().values()}
    assert engine.plan.resident_bytes == sum(held.values()) < exact.plan.resident_bytes
    x = torch.randn(8, engine.cfg.dim, generator=torch.Generator().manual_seed(1))
    for mlp, exact_mlp in zip(mlps, floats):
        y, y_exact = mlp(x), exact_mlp(x)
        assert (y - y_exact).norm() <= MLP_ERROR_BOUND[dtype] * y_exact.norm()
    got = engine.logits(ids)
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True, reduction="batchmean")
    assert kl <= RESIDENT_KL_BOUND[dtype]


def copy_checkpoint(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    return to


def load_int4(folder: Path, **options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = moe_local.load(folder, device="cpu", experts_dtype="int4", expert_slots=4, **options)
    return engine, [str(w.message) for w in caught]


def test_quantized_experts_are_cached_once_and_read_back(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_LOCAL_CACHE", str(tmp_path / "cache"))
    folder, _ = tiny
    first, warned = load_int4(folder)
    assert not warned and first.notes[-1].startswith("quantized the experts to int4-g32-cpu and cached them")
    files = cache_entries(tmp_path / "cache")
    assert len(files) == 1
    second, warned = load_int4(folder)
    assert not warned and second.notes[-1].startswith("read the int4-g32-cpu experts from the cache")
    ids = [3, 14, 15, 92, 65]
    assert torch.equal(first.logits(ids), second.logits(ids))
    moe_local.load(folder, device="cpu", experts_dtype="int8", expert_slots=4)
    assert len(cache_entries(tmp_path / "cache")) == 2  # one file per format
    assert list((tmp_path / "cache").glob("*.lock")) == []  # each writer removed its lock when done


def cache_entries(root: Path) -> list[Path]:
    return sorted(root.glob("*.safetensors"))


def corrupt_data(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(-100, os.SEEK_END)
        byte = f.read(1)
        f.seek(-100, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 1000)


def other_identity(path: Path) -> None:
    """The same name, built for something else (as a CUDA int4 file from another torch release would be)."""
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        head = f.read(n)
        f.seek(8)
        f.write(head.replace(b'moe_local_cache\\": 2', b'moe_local_cache\\": 0'))


@pytest.mark.parametrize(
    "damage, reason",
    [(corrupt_data, "checksum of layer 2 expert 7"), (truncate, "truncated"), (other_identity, "built from other files")],
)
def test_a_corrupt_or_stale_cache_entry_is_rebuilt_not_used(tiny, tmp_path, monkeypatch, damage, reason):
    monkeypatch.setenv("MOE_LOCAL_CACHE", str(tmp_path / "cache"))
    folder = copy_checkpoint(tiny[0], tmp_path / "ckpt")
    fresh, _ = load_int4(folder)
    (entry,) = cache_entries(tmp_path / "cache")
    damage(entry)
    rebuilt, warned = load_int4(folder)
    assert len(warned) == 1 and "cannot be used" in warned[0] and reason in warned[0]
    assert rebuilt.notes[-1].startswith("quantized the experts")
    ids = [3, 14, 15, 92, 65]
    assert torch.equal(rebuilt.logits(ids), fresh.logits(ids))
    again, warned = load_int4(folder)
    assert not warned and again.notes[-1].startswith("read the")  # the rebuilt file is whole


def test_a_renamed_folder_reuses_its_cache_file_and_writes_no_second_one(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_LOCAL_CACHE", str(tmp_path / "cache"))
    folder = copy_checkpoint(tiny[0], tmp_path / "qwen_copy")
    load_int4(folder)
    (entry,) = cache_entries(tmp_path / "cache")
    renamed = folder.rename(tmp_path / "qwen_moved")
    again, warned = load_int4(renamed)
    assert not warned and again.notes[-1] == f"read the int4-g32-cpu experts from the cache {entry}"
    assert cache_entries(tmp_path / "cache") == [entry]


def test_a_file_named_as_earlier_releases_named_it_is_read_not_built_again(tiny, tmp_path, monkeypatch):
    """They put the folder's name first; the file and its contents are the same."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOE_LOCAL_CACHE", str(cache))
    load_int4(tiny[0])
    (entry,) = cache_entries(cache)
    entry.rename(cache / f"tiny-{entry.name}")
    (cache / f"tiny-{entry.name}.lock").write_bytes(b"")  # and a lock file beside it, which they left
    again, warned = load_int4(tiny[0])
    assert not warned and again.notes[-1] == f"read the int4-g32-cpu experts from the cache {entry}"
    assert cache_entries(cache) == [entry] and list(cache.glob("*.lock")) == []


def test_a_moved_and_touched_checkpoint_reads_its_cache_again(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_LOCAL_CACHE", str(tmp_path / "cache"))
    folder = copy_checkpoint(tiny[0], tmp_path / "here" / "ckpt")
    first, _ = load_int4(folder)
    moved = tmp_path / "there" / "ckpt"
    moved.parent.mkdir()
    folder.rename(moved)
    for f in moved.iterdir():
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    again, warned = load_int4(moved)
    assert not warned and again.notes[-1].startswith("read the int4-g32-cpu experts from the cache")
    assert len(cache_entries(tmp_path / "cache")) == 1


def test_weights_replaced_with_same_sized_ones_and_the_old_mtime_are_quantized_again_and_the_old_file_removed(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_LOCAL_CACHE", str(tmp_path / "cache"))
    folder = copy_checkpoint(tiny[0], tmp_path / "ckpt")
    ids = [3, 14, 15, 92, 65]
    before = load_int4(folder)[0].logits(ids)
    (old,) = cache_entries(tmp_path / "cache")
    old_size = old.stat().st_size
    moe_local.load(folder, device="cpu", experts_dtype="int8", expert_slots=4)  # another format: not stale
    weights, stamp = folder / "model.safetensors", (folder / "model.safetensors").stat()
    other = tmp_path / "other"
    build_mixtral(other, None, seed=7)
    assert (other / "model.safetensors").stat().st_size == stamp.st_size
    shutil.copy(other / "model.safetensors", weights)
    os.utime(weights, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    after, warned = load_int4(folder)
    assert after.notes[-1].startswith("quantized the experts")
    assert not torch.equal(after.logits(ids), before)
    assert not old.exists() and len(cache_entries(tmp_path / "cache")) == 2  # the new int4 file and the int8 one
    new = Path(after.notes[-1].rsplit(" ", 1)[1])
    assert warned == [f"removed the quantized cache {old.name} ({format_bytes(old_size)}): it held the experts of an earlier "
                      f"version of {folder}'s weights, replaced by {new.name}"]


def test_a_lock_let_go_while_another_waits_on_its_file_is_never_held_twice(tmp_path, monkeypatch):
    """The holder removes the lock file as it lets go; a waiter that had opened that file then gets an flock
    on a file no longer at the lock's name, and must start again on the one there, not carry on beside
    a third process that created it."""
    entry = tmp_path / "entry.safetensors"
    blocked, holding, done = threading.Event(), threading.Event(), threading.Event()

    class Flock:  # fcntl, saying when a call is about to wait
        LOCK_EX, LOCK_NB = fcntl.LOCK_EX, fcntl.LOCK_NB

        @staticmethod
        def flock(fd: int, operation: int) -> None:
            if not operation & fcntl.LOCK_NB:
                blocked.set()
            fcntl.flock(fd, operation)

    def waiter() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "another moe-local process is quantizing..."
            with qcache.entry_lock(entry):
                holding.set()
                done.wait(timeout=60)

    monkeypatch.setattr(qcache, "fcntl", Flock)
    thread = threading.Thread(target=waiter)
    with qcache.entry_lock(entry):
        thread.start()
        assert blocked.wait(timeout=60)
    assert holding.wait(timeout=60)
    with qcache.entry_lock(entry, wait=False) as free:
        assert not free  # the waiter holds the lock at its name
    done.set()
    thread.join(timeout=60)
    assert not qcache.lock_path(entry).exists()


def test_temporary_files_of_an_interrupted_quantization_are_removed_by_the_next_load(tiny, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOE_LOCAL_CACHE", str(cache))
    cache.mkdir()
    abandoned = cache / "m-0123456789abcdef-int4-g32-cpu.safetensors.4242.tmp"  # its writer was killed
    abandoned.write_bytes(b"x" * 3 * 2**20)
    being_written = cache / "n-0123456789abcdef-int8-fp32.safetensors.4343.tmp"
    being_written.write_bytes(b"y")
    with qcache.entry_lock(cache / "n-0123456789abcdef-int8-fp32.safetensors"):  # its writer is alive
        engine, warned = load_int4(tiny[0])
    assert not abandoned.exists() and being_written.exists()
    assert warned == [f"removed 3.00 MiB of temporary files that an interrupted quantization left in {cache}"]
    assert engine.notes[-1].startswith("quantized the experts")


def test_a_second_process_waits_for_the_first_and_reads_what_it_wrote(tiny, tmp_path, monkeypatch):
    """This test plays the first process: it holds the entry's lock while the entry is not there yet."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOE_LOCAL_CACHE", str(cache))
    load_int4(tiny[0])
    (entry,) = cache_entries(cache)
    written = entry.rename(tmp_path / "written")
    with qcache.entry_lock(entry):
        second = subprocess.Popen(
            [sys.executable, "-m", "moe_local", "run", str(tiny[0]), "-p", "hi", "-n", "1", "--experts-dtype", "int4",
             "--expert-slots", "4", "--device", "cpu", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        waiting = second.stderr.readline()
        assert waiting.startswith("warning: another moe-local process is quantizing these experts into") and "waiting" in waiting
        written.rename(entry)  # what the first process wrote
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err
    assert f"read the int4-g32-cpu experts from the cache {entry}" in err
    assert list(cache.glob("*.lock")) == []


def test_cache_list_and_clear(tiny, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOE_LOCAL_CACHE", str(cache))
    load_int4(tiny[0])
    (entry,) = cache_entries(cache)
    (cache / "chats").mkdir()  # chats saved beside the cache are not the cache's to clear
    (cache / "chats" / "a.json").write_text("{}")
    listed = json.loads(moe_local_cli("cache", "list", "--json").stdout)
    assert listed["folder"] == str(cache)
    assert listed["entries"] == [{"file": entry.name, "bytes": entry.stat().st_size, "format": "int4-g32-cpu", "model": str(tiny[0])}]
    assert entry.name in moe_local_cli("cache", "list").stdout
    cleared = moe_local_cli("cache", "clear")
    assert cleared.returncode == 0 and cleared.stdout.startswith("removed 1 files")
    assert cache_entries(cache) == [] and (cache / "chats" / "a.json").is_file()
    assert json.loads(moe_local_cli("cache", "list", "--json").stdout)["entries"] == []


def test_an_unwritable_cache_costs_only_the_cache(tiny, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("MOE_LOCAL_CACHE", str(tmp_path / "a-file" / "cache"))  # cannot be created, even by root
    engine, warned = load_int4(tiny[0])
    assert len(warned) == 1 and "could not write the quantized cache" in warned[0]
    assert engine.notes[-1] == "quantized the experts to int4-g32-cpu"
    assert len(list(engine.generate([1, 2, 3], 4, GREEDY))) == 4


PEAK_SCRIPT = textwrap.dedent("""
    import json, sys, psutil, torch, moe_local, moe_local.engine  # `moe_local` imports its engine lazily: count the code in the base, not in the load
    from pathlib import Path
    status = Path("/proc/self/status")
    base = psutil.Process().memory_info().rss
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    engine = moe_local.load(sys.argv[1], device="cpu", experts_dtype=sys.argv[2], ctx_size=64, prefetch=False)
    peak = next(int(line.split()[1]) * 1024 for line in status.read_text().splitlines() if line.startswith("VmHWM"))
    print(json.dumps({"base": base, "peak": peak, "store": engine.store.total_bytes, "beside": engine.plan.beside_store_bytes}))
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-RSS reset")
def test_quantizing_needs_the_quantized_size_plus_about_one_layer_not_the_whole_model(tmp_path):
    """A checkpoint with 400 MB of bf16 experts: quantizing to int4 (~110 MB) peaks at the store, the rest
    of the model and one layer's worth of source matrices (plus allocator slack), and so does reading the
    cache back. Measured by the kernel's peak-RSS counter in a fresh process."""
    folder = tmp_path / "ckpt"
    build_mixtral(folder, None, dtype=torch.bfloat16, hidden_size=512, intermediate_size=1024, num_hidden_layers=16,
                  num_attention_heads=8, num_key_value_heads=2, vocab_size=256, initializer_range=0.02)
    bf16_experts = 16 * 8 * 3 * 512 * 1024 * 2
    one_layer = bf16_experts // 16
    env = {**os.environ, "MOE_LOCAL_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "2"}
    try:
        for attempt in ("quantize", "read the cache"):
            out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(folder), "int4"], capture_output=True, text=True, env=env)
            assert out.returncode == 0, out.stderr
            m = json.loads(out.stdout)
            allowed = m["store"] + m["beside"] + one_layer + 64 * 2**20  # 64 MiB: the allocator's and torch's slack
            assert m["store"] < bf16_experts / 3.5 and allowed < 0.6 * bf16_experts  # the bound tells the two apart
            assert m["peak"] - m["base"] <= allowed, (attempt, m)
    finally:  # half a GB that pytest would otherwise keep in its last three temporary folders
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)


def test_auto_picks_the_widest_format_that_fits_and_says_why():
    cfg = small_config(hidden_size=64, intermediate_size=96)
    bf16 = make_format("bf16", cfg, torch.bfloat16, "cpu").expert_bytes * 8
    fmt, why = choose_format("auto", cfg, torch.bfloat16, "cpu", None, available=10 * bf16)
    assert fmt.key == "bf16" and why.startswith("experts in bf16 (auto:")
    fmt, why = choose_format("auto", cfg, torch.bfloat16, "cpu", None, available=bf16)
    assert fmt.key == "int8-bf16" and "bf16 would need" in why
    fmt, why = choose_format("auto", cfg, torch.bfloat16, "cpu", None, available=bf16 // 2)
    assert fmt.key == "int4-g32-cpu" and "int8 would need" in why
    with pytest.raises(BudgetError, match="do not fit in host RAM in any format"):
        choose_format("auto", cfg, torch.bfloat16, "cpu", None, available=bf16 // 8)
    fmt, why = choose_format("int8", cfg, torch.bfloat16, "cpu", None, available=1)  # asked for: no RAM check here
    assert why == "experts in int8-bf16 (--experts-dtype int8)"


def test_bad_group_sizes_are_one_line_errors(tiny):
    cfg = small_config(hidden_size=64, intermediate_size=96)
    with pytest.raises(ConfigError, match="does not divide"):
        make_format("int4", cfg, torch.bfloat16, "cpu", group_size=64)
    with pytest.raises(ConfigError, match="must be one of 32, 64, 128, 256"):
        make_format("int4", cfg, torch.bfloat16, "cpu", group_size=48)
    result = moe_local_cli("run", str(tiny[0]), "-p", "hi", "--experts-dtype", "int4", "--group-size", "128")
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        "error: --group-size 128 does not divide the hidden size (64) and the expert FFN size (96); try 32"
    ]
    result = moe_local_cli("run", str(tiny[0]), "-p", "hi", "--experts-dtype", "int3")
    assert result.returncode != 0 and "int3" in result.stderr and len(result.stderr.strip().splitlines()) == 1

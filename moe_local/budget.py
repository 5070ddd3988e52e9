"""Memory planning: how a `--gpu-memory` budget splits into resident weights, KV cache, workspace and
expert slots."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import psutil
import torch

from moe_local import int4
from moe_local.config import ModelConfig
from moe_local.errors import BudgetError, MoeLocalError


SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
MAX_SIZE = 2**50  # 1 PiB: more than any machine's memory, so a larger size is a typo
# Snapshots of its recurrent states a sequence keeps (a model with linear-attention layers, `engine.Snapshot`): the
# ends of its last prefills and the marks they were given, the oldest dropped first. Two are what a chat's turn
# needs (where its conversation ended before the answer, and the prompt's end); the server's rows keep a few more.
SNAPSHOTS = 4


def parse_size(size: str | int) -> int:
    """`12GiB`, `12GB`, `500MiB`, `1.5GiB`, `4096B`; an int is a number of bytes. A string needs its unit:
    `--gpu-memory 12` would mean 12 bytes, which is never what was meant."""
    if isinstance(size, int):
        n_bytes = size
    else:
        match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)", str(size).strip())
        if not match:
            raise BudgetError(f"cannot read memory size {size!r}: write it like 12GiB, 12GB or 500MiB")
        number, unit = match.groups()
        if not unit:
            raise BudgetError(f"memory size {size!r} has no unit: write {number}GiB (or GB, MiB, MB; B for bytes)")
        if unit.upper() not in SIZE_UNITS:
            raise BudgetError(f"cannot read memory size {size!r}: unknown unit {unit!r} (B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)")
        n_bytes = int(float(number) * SIZE_UNITS[unit.upper()])
    if not 0 <= n_bytes <= MAX_SIZE:
        raise BudgetError(f"memory size {size!r} is out of range: it must be between 0 and 1024TiB")
    return n_bytes


def format_bytes(n_bytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.2f} {unit}"
    return f"{n_bytes} B"


def check_host_ram(needed_bytes: int, what: str, plan: MemoryPlan | None = None) -> None:
    """Refuse up front rather than let a huge allocation swap the machine to death; where `plan`'s snapshots
    tip it, say so."""
    available = psutil.virtual_memory().available
    if needed_bytes > available:
        tip = snapshots_tip(plan.snapshot_bytes, plan.sequences, needed_bytes, available) if plan else ""
        raise BudgetError(
            f"{what} need {format_bytes(needed_bytes)} of host RAM but only {format_bytes(available)} is available{tip}"
        )


def snapshots_tip(snapshot_bytes: int, sequences: int, needed: int, room: int) -> str:
    """The end of a host-RAM refusal's message where a hybrid's snapshots (`snapshot_bytes` of `sequences`
    sequences) are what takes `needed` over `room`; else nothing."""
    if not snapshot_bytes or needed <= room or needed - snapshot_bytes > room:
        return ""
    rows = f" x {sequences} sequences" if sequences > 1 else ""
    fewer = ": fewer --parallel rows keep fewer" if sequences > 1 else ""
    return (f"; the snapshots of the linear-attention layers' state tip it ({SNAPSHOTS} per sequence{rows}, "
            f"{format_bytes(snapshot_bytes)}){fewer}")


@dataclass(frozen=True)
class MemoryPlan:
    device: str
    budget_bytes: int | None  # None: slots were given directly, or the device default was used
    resident_bytes: int  # on the device: attention, norms, routers, lm_head, and the embeddings but on a GPU
    kv_bytes: int
    workspace_bytes: int  # activations of one prefill chunk
    workspace_measured: bool  # measured on the device, or estimated from the geometry
    expert_bytes: int
    expert_slots: int  # 0: on the CPU with no budget, every expert runs in place from the store
    total_experts: int
    host_resident_bytes: int = 0  # beside a GPU, the token embeddings, in host RAM (`embeddings_on_host`)
    snapshot_bytes: int = 0  # in host RAM on any device: the most the sequences' snapshots hold (`snapshot_bytes`)
    sequences: int = 1  # KV caches (and snapshots) planned: the server's --parallel rows, else one

    @property
    def in_place(self) -> bool:
        return self.expert_slots == 0

    @property
    def fixed_bytes(self) -> int:
        return self.resident_bytes + self.kv_bytes + self.workspace_bytes

    @property
    def slot_bytes(self) -> int:
        return self.expert_slots * self.expert_bytes

    @property
    def beside_store_bytes(self) -> int:
        """Host RAM needed beside the expert store: on the CPU the resident part, KV cache and slots live there;
        beside a GPU the token embeddings; on both, a hybrid's snapshots."""
        device = self.fixed_bytes + self.slot_bytes if self.device == "cpu" else self.host_resident_bytes
        return device + self.snapshot_bytes

    def as_dict(self) -> dict:
        return asdict(self)


def workspace_bytes(cfg: ModelConfig, dtype: torch.dtype, ctx_size: int, chunk: int) -> int:
    """Largest activations of one prefill chunk: hidden/attention/expert tensors, the attention scores
    (when the kernel materialises them) and the chunk's fp32 logits."""
    activations = chunk * (4 * cfg.dim + 3 * cfg.ffn_dim) * dtype.itemsize
    scores = cfg.n_heads * chunk * ctx_size * dtype.itemsize
    return activations + scores + chunk * cfg.vocab_size * 4


def snapshot_bytes(cfg: ModelConfig, dtype: torch.dtype, sequences: int = 1) -> int:
    """The most host RAM the snapshots of `sequences` sequences hold: SNAPSHOTS copies each of the linear-attention
    layers' state (`sequence_state_bytes`, the conv inputs in `dtype`); none for a model without such layers."""
    return sequences * SNAPSHOTS * cfg.sequence_state_bytes(dtype)


def embeddings_on_host(cfg: ModelConfig, device: torch.device) -> bool:
    """Beside a GPU the token embeddings stay in host RAM, as llama.cpp keeps them: a lookup of a few rows is
    no work for the CPU, and the table is as large as lm_head (1.2 GB for gpt-oss, 0.6 GB for Qwen3-30B-A3B),
    room for expert slots. A tied table is lm_head's weight too, and stays on the device."""
    return device.type == "cuda" and not cfg.tie_word_embeddings


def embeddings_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    return cfg.vocab_size * cfg.dim * dtype.itemsize


def lm_head_quantized(cfg: ModelConfig, device_type: str, attention: str | None) -> bool:
    """Whether `--resident-dtype int8` or `int4` keeps lm_head in int8 too: on the CPU, where every token reads
    it whole (1.2 GB in bf16 for gpt-oss's 201k-token vocabulary, as much as its active experts), and where it
    is not the token embeddings' table as well (tied)."""
    return attention is not None and device_type == "cpu" and not cfg.tie_word_embeddings


def resident_bytes(cfg: ModelConfig, dtype: torch.dtype, attention: str | None = None, embeddings: bool = True, device_type: str = "cuda") -> int:
    """Bytes of everything but the experts (without the token embeddings unless `embeddings`); with `attention`
    (the resident dtype) "int8" the attention projections and the dense and shared MLPs take one byte per weight
    and a scale (in `dtype`) per output channel, with "int4" half a byte per weight and a bf16 scale and zero per
    group (`int4.group_for` each kind's shapes, which refuses shapes `device_type`'s int4 packing cannot take);
    lm_head in int8 where `lm_head_quantized`."""
    total = cfg.resident_numel() * dtype.itemsize - (0 if embeddings else embeddings_bytes(cfg, dtype))
    if attention is None:
        return total
    if lm_head_quantized(cfg, device_type, attention):  # one byte a weight and a scale a row, for `dtype`'s itemsize each
        total -= cfg.vocab_size * (cfg.dim * (dtype.itemsize - 1) - dtype.itemsize)
    mlp_numel, mlp_rows = sum(n * k for n, k in cfg.mlp_matrices), sum(n for n, _ in cfg.mlp_matrices)
    for numel, rows, shapes in ((cfg.projection_numel, cfg.projection_rows, cfg.projection_shapes), (mlp_numel, mlp_rows, cfg.mlp_shapes)):
        total -= numel * dtype.itemsize
        if attention == "int8":
            total += numel + rows * dtype.itemsize
        elif numel:
            total += numel // 2 + numel // int4.group_for(shapes, device_type) * 4
    return total


def plan_memory(
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    ctx_size: int,
    prefill_chunk: int,
    gpu_memory: str | int | None = None,
    expert_slots: int | None = None,
    workspace: int | None = None,
    expert_bytes: int | None = None,
    attention: str | None = None,
    sequences: int = 1,
) -> MemoryPlan:
    """Split the budget; `workspace` is a measured peak (see `Engine.from_folder`), else it is estimated;
    `expert_bytes` is one expert in its format (default: unquantized, in `dtype`); `attention` for
    `--resident-dtype int8` or `int4`; `sequences` KV caches of `ctx_size` tokens (the server's `--parallel`),
    and their snapshots."""
    total = cfg.n_moe_layers * cfg.n_experts
    expert = expert_bytes or cfg.expert_numel * dtype.itemsize
    on_host = embeddings_on_host(cfg, device)
    resident = resident_bytes(cfg, dtype, attention, embeddings=not on_host, device_type=device.type)
    kv = cfg.kv_cache_bytes(ctx_size, dtype) * sequences
    work = workspace if workspace is not None else workspace_bytes(cfg, dtype, ctx_size, min(prefill_chunk, ctx_size))
    fixed = resident + kv + work
    budget = parse_size(gpu_memory) if gpu_memory is not None else None
    if expert_slots is not None:
        if not 1 <= expert_slots <= total:
            raise BudgetError(f"--expert-slots must be between 1 and {total} (the model's experts), not {expert_slots}")
        slots = expert_slots
        if budget is not None and fixed + slots * expert > budget:
            raise BudgetError(
                f"--expert-slots {slots} needs {format_bytes(fixed + slots * expert)} on {device.type}, "
                f"more than --gpu-memory {format_bytes(budget)}"
            )
    else:
        if budget is None and device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = int(free * 0.9)  # leave room for the CUDA context and allocator slack
        if budget is None:
            slots = 0  # the CPU default: every expert runs in place from host RAM (`InPlaceExperts`)
        else:
            if budget < fixed + expert:
                raise BudgetError(
                    f"a {format_bytes(budget)} budget is too small: resident weights {format_bytes(resident)} + KV cache for "
                    f"{ctx_size} tokens{f' x {sequences} sequences' if sequences > 1 else ''} {format_bytes(kv)} + workspace {format_bytes(work)} + one expert slot {format_bytes(expert)} "
                    f"need at least {format_bytes(fixed + expert)}{what_would_fit(cfg, dtype, device, budget, fixed - resident + expert, resident, attention, on_host)}"
                )
            slots = min(total, (budget - fixed) // expert)
    host = embeddings_bytes(cfg, dtype) if on_host else 0
    return MemoryPlan(device.type, budget, resident, kv, work, workspace is not None, expert, slots, total, host,
                      snapshot_bytes(cfg, dtype, sequences), sequences)


def what_would_fit(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, budget: int, rest: int, resident: int,
                   attention: str | None, on_host: bool) -> str:
    """The end of a too-small budget's message: the --resident-dtype that makes the plan fit as it is (the
    resident part is what outgrows a small GPU: GLM-4.5-Air's 12.25 GiB in bf16 are 4.16 in int4), and
    --ctx-size where a shorter context could (the KV cache and the workspace shrink with it; `rest` is them
    and one expert slot)."""
    fits, shorter = [], []  # smaller resident dtypes that fit as they are / with a shorter context
    for smaller in ("int8", "int4")[("int8", "int4").index(attention) + 1 if attention else 0 :]:
        try:
            weights = resident_bytes(cfg, dtype, smaller, embeddings=not on_host, device_type=device.type)
        except MoeLocalError:  # int4 cannot pack these shapes on this device
            continue
        if weights + rest <= budget:
            fits.append(f"--resident-dtype {smaller} ({format_bytes(weights + rest)} in all)")
        elif weights < budget:
            shorter.append(smaller)
    hints = [f"{' or '.join(fits)} would fit"] if fits else []
    if resident < budget:
        hints.append("lower --ctx-size")
    elif shorter and not fits:
        hints.append(f"--resident-dtype {shorter[0]} with a lower --ctx-size")
    if hints:
        return ": " + ", or ".join(hints)
    return f": the resident weights alone take more{'' if attention == 'int4' else ', also in int4 (--resident-dtype int4)'}"


def check_beside_experts(plan: MemoryPlan, ctx_size: int, attention: str | None, available: int | None = None,
                         context_flag: str = "--ctx-size") -> None:
    """On the CPU the resident part, the KV cache and the workspace live in host RAM beside the experts (with a
    hybrid's snapshots); when they alone take more than is available, no format of the experts can help: say
    which of them is too large and what shrinks it (`-c 100000000` is a 670 GiB KV cache, not experts that do
    not fit)."""
    available = psutil.virtual_memory().available if available is None else available
    beside = plan.fixed_bytes + plan.snapshot_bytes
    if plan.device != "cpu" or beside <= available:
        return
    if plan.fixed_bytes <= available:
        raise BudgetError(f"the rest of the model beside the experts on the CPU needs {format_bytes(beside)} of host RAM, more than "
                          f"the {format_bytes(available)} available" + snapshots_tip(plan.snapshot_bytes, plan.sequences, beside, available))
    context = plan.kv_bytes + plan.workspace_bytes  # both grow with the context: a prefill chunk's attention scores span it
    if context >= plan.resident_bytes:
        what, size = (f"a context of {ctx_size} tokens needs {format_bytes(context)} of host RAM on the CPU (KV cache "
                      f"{format_bytes(plan.kv_bytes)}, a prefill chunk's workspace {format_bytes(plan.workspace_bytes)})"), context
        fix = f"lower {context_flag}"
    else:
        what, size = f"the resident weights need {format_bytes(plan.resident_bytes)} of host RAM on the CPU", plan.resident_bytes
        fix = "--resident-dtype int8 or int4 makes them smaller" if attention is None else ""
    if size <= available:  # the two together are what does not fit
        what += f", {format_bytes(plan.fixed_bytes)} with the rest beside the experts"
    raise BudgetError(f"{what}, more than the {format_bytes(available)} available" + (f": {fix}" if fix else ""))


def host_bytes_needed(plan: MemoryPlan) -> int:
    """Host RAM for the expert store and a hybrid's snapshots, and on the CPU for everything else too."""
    return plan.total_experts * plan.expert_bytes + plan.beside_store_bytes


def plan_report(cfg: ModelConfig, plan: MemoryPlan, ctx_size: int) -> dict:
    """What `moe-local plan` prints: where the memory goes and what to expect from it, without loading.

    Under uniform routing (the worst case for a cache; random routers route so) a requested expert is
    resident with probability slots / experts when each layer keeps an even share of the slots; in place,
    every expert is where it runs."""
    hit_rate = 1.0 if plan.in_place else plan.expert_slots / plan.total_experts
    misses_per_token = (1 - hit_rate) * cfg.n_moe_layers * cfg.top_k
    return {
        "parameters": cfg.parameter_counts(),
        "device": plan.device,
        "budget_bytes": plan.budget_bytes,
        "resident_bytes": plan.resident_bytes,
        "host_resident_bytes": plan.host_resident_bytes,
        "ctx_size": ctx_size,
        "kv_bytes": plan.kv_bytes,
        "sequences": plan.sequences,
        "snapshot_bytes": plan.snapshot_bytes,
        "snapshots_per_sequence": SNAPSHOTS if plan.snapshot_bytes else 0,
        "workspace_bytes": plan.workspace_bytes,
        "workspace_measured": plan.workspace_measured,
        "expert_bytes": plan.expert_bytes,
        "expert_slots": plan.expert_slots,
        "in_place": plan.in_place,
        "slot_bytes": plan.slot_bytes,
        "total_experts": plan.total_experts,
        "experts_per_layer": plan.expert_slots / cfg.n_moe_layers,
        "host_bytes_needed": host_bytes_needed(plan),
        "host_bytes_available": psutil.virtual_memory().available,
        "expected_hit_rate_uniform": hit_rate,
        "expected_h2d_bytes_per_token_uniform": round(misses_per_token * plan.expert_bytes),
    }

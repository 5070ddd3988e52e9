"""`Engine`: a loaded model (resident part on the device, experts behind the offloading runtime), its
KV cache and tokenizer; `load()` is the library's entry point."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from moe_local import native
from moe_local.budget import (SNAPSHOTS, MemoryPlan, check_beside_experts, check_host_ram, embeddings_bytes, embeddings_on_host,
                              host_bytes_needed, lm_head_quantized, plan_memory, snapshot_bytes)
from moe_local.checkpoint import open_checkpoint, resolve_model_path
from moe_local.config import DTYPES, ModelConfig
from moe_local.cpu_matmul import matmuls_for_rows
from moe_local.errors import ConfigError, MoeLocalError, TokenizerError
from moe_local.experts.cache import POLICIES, ExpertCache
from moe_local.experts.prefetch import Prefetcher
from moe_local.experts.cpu import AGREEMENT, CPU_EXPERTS, disagreement, measure_speeds
from moe_local.experts.runtime import InPlaceExperts, OffloadedExperts, mix
from moe_local.experts.formats import EXPERTS_DTYPES, ExpertFormat, choose_format, gguf_format
from moe_local.experts.qcache import fill_quantized
from moe_local.experts.store import ExpertStore
from moe_local.generate import GenerationStats, SamplingParams, generate
from moe_local.graphs import StaticDecoder
from moe_local.model import KVCache, KVPool, Transformer
from moe_local.threads import thread_count
from moe_local.tokenizer import Tokenizer, load_tokenizer
from moe_local.weights.gguf_model import GgufModel

if TYPE_CHECKING:
    from moe_local.grammar import Constraint


RESIDENT_DTYPES = ("auto", "int8", "int4")


@dataclass(frozen=True)
class Options:
    """Every load-time option and its default, in one place (the CLI reads these defaults too)."""

    device: str | None = None  # "cuda" when available, else "cpu"
    dtype: str | None = None  # compute dtype; default: the checkpoint's
    gpu_memory: str | int | None = None  # budget on the device for everything, e.g. "12GiB"
    expert_slots: int | None = None  # overrides the slot count that gpu_memory implies
    ctx_size: int | None = None  # default: min(4096, the model's max_position_embeddings)
    prefetch: bool = True
    prefetch_top: int | None = 1  # experts per token to prefetch, the likeliest first (None: all top_k);
    # 1 was as fast as or faster than 2 and than no prefetch in the H100 runs of docs/measurements.md
    policy: str = "layer-lru"  # see experts/cache.py and docs/measurements.md for the comparison
    prefill_chunk: int = 512  # tokens per prefill step: bounds the workspace
    experts_dtype: str = "auto"  # see experts/formats.py: auto, bf16, fp16, fp32, int8, int4
    group_size: int | None = None  # int4 group size; default 128 (or the largest of 64, 32 the model allows)
    resident_dtype: str = "auto"  # auto: the compute dtype; int8, int4: the attention projections and MLPs in int8 or int4
    sequences: int = 1  # KV caches to plan for: one per request decoded together (`serve --parallel`)
    cpu_experts: str = "auto"  # where misses run: auto (experts/cpu.py's cost model), never (copied), always (CPU)
    # one-token steps replay a CUDA graph per layer for its resident work (graphs.py); None: where the device is
    # CUDA (H100, 2026-11-26: decode 1.3-2.4x, docs/measurements.md)
    cuda_graphs: bool | None = None
    # CPU threads for torch and moe-local's kernels, fixed; None: torch's count, on the CPU device re-chosen from
    # the idle cores as the engine works (threads.py)
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"unknown eviction policy {self.policy!r} (choose from {', '.join(POLICIES)})")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r} (choose from bf16, fp16, fp32)")
        if self.ctx_size is not None and self.ctx_size < 1:
            raise ConfigError(f"--ctx-size must be positive, not {self.ctx_size}")
        if self.experts_dtype not in EXPERTS_DTYPES:
            raise ConfigError(f"unknown experts dtype {self.experts_dtype!r} (choose from {', '.join(EXPERTS_DTYPES)})")
        if self.prefill_chunk < 1:
            raise ConfigError("prefill_chunk must be positive")
        if self.sequences < 1:
            raise ConfigError(f"sequences must be at least 1, not {self.sequences}")
        if self.resident_dtype not in RESIDENT_DTYPES:
            raise ConfigError(f"unknown resident dtype {self.resident_dtype!r} (choose from {', '.join(RESIDENT_DTYPES)})")
        if self.cpu_experts not in CPU_EXPERTS:
            raise ConfigError(f"unknown --cpu-experts {self.cpu_experts!r} (choose from {', '.join(CPU_EXPERTS)})")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be at least 1, not {self.threads}")

    @property
    def gpu_flags(self) -> tuple[str, ...]:
        """The flags given that size a GPU's expert slots."""
        return tuple(flag for flag, value in (("--gpu-memory", self.gpu_memory), ("--expert-slots", self.expert_slots)) if value is not None)

    @property
    def attention_dtype(self) -> str | None:
        """int8 or int4 where `resident_dtype` quantizes the attention projections and MLPs, else None."""
        return None if self.resident_dtype == "auto" else self.resident_dtype

    def compute_dtype(self, checkpoint_dtype: torch.dtype) -> torch.dtype:
        return DTYPES[self.dtype] if self.dtype else checkpoint_dtype

    def context_size(self, cfg: ModelConfig) -> int:
        return self.ctx_size or min(4096, cfg.max_position_embeddings)


@dataclass
class Snapshot:
    """A sequence's recurrent states (each linear-attention layer's conv state and delta-rule state, copied to
    host RAM) after `ids`: a prompt that starts with ids resumes there, with the other layers' keys and values of
    ids, which the sequence's cache holds as long as its tokens start with ids. A recurrent state cannot be cut
    back to a prefix, so this is how a new turn whose prompt leaves what the cache holds (an earlier answer
    rendered otherwise than it was generated, a thinking block dropped) is still evaluated from near its end.
    A sequence keeps up to `budget.SNAPSHOTS` of them, which the plan counts (`budget.snapshot_bytes`)."""

    ids: list[int]
    states: list[torch.Tensor]


@dataclass
class Sequence:
    """One sequence's KV cache and the ids whose keys and values it holds, in order, and (with linear-attention
    layers) snapshots of its recurrent states at earlier points. The engine has one of its own (`run`, `chat`);
    the server keeps one per parallel request and decodes them as a batch."""

    kv: KVCache
    tokens: list[int]
    snapshots: list[Snapshot] = field(default_factory=list)


def resolve_device(name: str | None, gpu_flags: tuple[str, ...] = ()) -> torch.device:
    """The device `--device name` asks for; None: CUDA where there is one, else the CPU, said once in a warning
    when `gpu_flags` (the GPU's flags that were given: --gpu-memory, --expert-slots) show that a GPU was expected."""
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if gpu_flags:
            them = " and ".join(gpu_flags)
            warnings.warn(f"no CUDA GPU was found (this PyTorch build sees none), so the model runs on the CPU, where {them} "
                          f"make{'s' if len(gpu_flags) == 1 else ''} a pool of expert slots in host RAM that stands in for a GPU's: "
                          f"slower than every expert in place, which is what the CPU runs without {'it' if len(gpu_flags) == 1 else 'them'}")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r} (use cpu or cuda)") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {name!r} (use cpu or cuda)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but this PyTorch build sees no CUDA GPU")
    return device


class Engine:
    """A model ready to run: the resident part on the device, the experts in `store` behind a slot cache,
    a KV cache and (when the model has one) a tokenizer. `Engine.from_folder` (or `load`) builds one from
    a checkpoint; the benchmark builds one from generated weights."""

    def __init__(
        self,
        model: Transformer,
        store: ExpertStore,
        plan: MemoryPlan,
        options: Options,
        ctx_size: int,
        tokenizer: Tokenizer | None = None,
        generation_config: dict | None = None,
        folder: Path | None = None,
        notes: list[str] | None = None,
    ):
        self.model, self.store, self.plan, self.options = model.eval(), store, plan, options
        self.cfg, self.ctx_size, self.folder = model.cfg, ctx_size, folder
        self.dtype, self.device = model.norm.weight.dtype, model.norm.weight.device
        self.notes = notes or []  # what loading chose and did, for the CLI to show
        self._tokenizer, self.generation_config = tokenizer, generation_config or {}
        if options.cuda_graphs and self.device.type != "cuda":
            raise ConfigError("--cuda-graphs needs a CUDA device")
        self.kv_pool = KVPool(self.cfg, ctx_size, self.dtype, self.device, options.sequences)
        self._free_rows = list(range(options.sequences))
        self.sequence = self.new_sequence()
        self.experts = self._expert_runtime(model, store, plan, options)
        if self.device.type == "cpu":
            model.widen_prefill()
            model.fuse_decode()
        # the engine's own sequence decodes through it (`decode_one`); the server's batches do not
        graphs = options.cuda_graphs if options.cuda_graphs is not None else self.device.type == "cuda"
        self.static = StaticDecoder(model, self.sequence.kv, capture=True) if graphs else None
        self.threads = thread_count(options.threads, self.device.type)  # None: the count is fixed

    def _expert_runtime(self, model: Transformer, store: ExpertStore, plan: MemoryPlan, options: Options):
        """On the CPU with no slot count or budget given: every expert in place (no slots, no copies). Otherwise
        the slot pool (on the CPU it stands in for a device: that is how the tests exercise it), with the CPU
        channel for misses as `cpu_experts` says; `auto` measures the channels first. On the CPU device `auto`
        is `never`: there the CPU channel is the same processor, and copying is pure loss."""
        if plan.in_place:
            return InPlaceExperts(store)
        policy = POLICIES[options.policy](plan.expert_slots, self.cfg.n_moe_layers)
        cache = ExpertCache(store, plan.expert_slots, self.device, policy)
        prefetcher = Prefetcher(model.routers(), self.cfg.top_k, options.prefetch_top) if options.prefetch else None
        cpu_experts, speeds = options.cpu_experts, None
        kernels = self.device.type != "cpu"  # moe-local's CPU kernels beside a GPU; on the CPU device, torch's as in the slots
        if cpu_experts == "auto" and self.device.type == "cpu":
            cpu_experts = "never"
        why = store.format.cpu_unavailable() if cpu_experts != "never" else None
        if cpu_experts != "never" and why is None:
            off = disagreement(store, cache.slots[0], self.dtype, kernels)
            if off > AGREEMENT:
                why = f"the CPU's result for an expert in {store.format.key} differs from the {self.device.type.upper()}'s by {off:.0%} (rms)"
        if why:
            if cpu_experts == "always":
                raise ConfigError(f"--cpu-experts always: {why}")
            cpu_experts = "never"
            self.notes.append(f"misses are all copied: {why}")
        if cpu_experts == "auto":
            speeds = measure_speeds(store, cache.slots[0], self.dtype, kernels)  # before warm-up fills that slot
        experts = OffloadedExperts(cache, prefetcher, self.cfg.n_moe_layers, cpu_experts, speeds)
        experts.warm()
        return experts

    @classmethod
    def from_folder(cls, folder: Path, options: Options, progress: Callable[[int, int], None] | None = None) -> Engine:
        """progress(done_bytes, total_bytes) is called while the experts are read into host memory."""
        if options.threads is not None:
            torch.set_num_threads(options.threads)  # for the load's work too
        ckpt = open_checkpoint(folder)
        gguf = isinstance(ckpt, GgufModel)
        cfg = ckpt.config
        device = resolve_device(options.device, options.gpu_flags)
        dtype = options.compute_dtype(ckpt.dtype)
        ctx_size = options.context_size(cfg)
        # on the CPU the resident part and the slots take host RAM too: `auto` counts them (slots as if bf16)
        attention = options.attention_dtype
        # beside a GPU: the token embeddings and a hybrid's snapshots
        beside = (embeddings_bytes(cfg, dtype) if embeddings_on_host(cfg, device) else 0) + snapshot_bytes(cfg, dtype, options.sequences)
        if device.type == "cpu":
            alone = plan_memory(cfg, dtype, device, ctx_size, options.prefill_chunk, attention=attention, sequences=options.sequences)
            check_beside_experts(alone, ctx_size, attention)  # a context too long is its own error, not experts that do not fit
            beside = alone.beside_store_bytes
        if gguf and options.experts_dtype == "auto":
            fmt, why = gguf_format(ckpt.layer_expert_types(), cfg, dtype, device.type)
        else:
            fmt, why = choose_format(options.experts_dtype, cfg, dtype, device.type, options.group_size, beside,
                                     sequences=options.sequences)
        plan = plan_memory(
            cfg, dtype, device, ctx_size, options.prefill_chunk, options.gpu_memory, options.expert_slots,
            expert_bytes=fmt.expert_bytes, attention=attention, sequences=options.sequences,
        )
        notes = [why]
        # Read the small files first, so that a broken one fails before the slow part.
        generation_config = {} if gguf else read_json(folder / "generation_config.json")
        has_tokenizer = gguf or (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()
        tokenizer = load_tokenizer(folder) if has_tokenizer else None
        check_host_ram(host_bytes_needed(plan), "the experts (and, on the CPU, the rest of the model)", plan)  # naming what tips it
        store = ExpertStore(cfg, fmt, pin=device.type == "cuda", extra_host_bytes=plan.beside_store_bytes)
        try:
            # quantized experts are cached on disk; experts already in the format are copied as they are
            if fmt.quantized and not fmt.native:
                notes.append(fill_quantized(ckpt, store, device, progress))
            else:
                store.fill_from(ckpt.expert, device, progress)
            host = {"tok_embeddings.weight"} if embeddings_on_host(cfg, device) else set()
            model = Transformer.from_state_dict(cfg, ckpt.resident_state_dict(dtype, device, host), device)
        finally:
            ckpt.close()
        if attention:
            model.quantize_resident(attention)
            head = ", lm_head in int8" if lm_head_quantized(cfg, device.type, attention) else ""
            mlps = " and MLP" if cfg.mlp_matrices else ""  # the dense layers' and the shared experts'
            notes.append(f"attention{mlps} weights in {attention}{head} (--resident-dtype {attention})")
        if device.type == "cpu" and (why_not := native.unavailable()):
            notes.append(f"moe-local's CPU kernels are not built, torch's are slower (decode attention ~1.5x, MXFP4 experts ~18x): {why_not}")
        if device.type == "cuda":  # replace the estimated workspace by a measured one before sizing the pool
            workspace = measure_workspace(model, fmt, ctx_size, options.prefill_chunk)
            plan = plan_memory(
                cfg, dtype, device, ctx_size, options.prefill_chunk, plan.budget_bytes, options.expert_slots, workspace,
                fmt.expert_bytes, attention, options.sequences,
            )
        return cls(model, store, plan, options, ctx_size, tokenizer, generation_config, folder, notes)

    @property
    def kv(self) -> KVCache:
        return self.sequence.kv

    @property
    def tokens(self) -> list[int]:
        """The ids whose keys and values the engine's own KV cache holds, in order."""
        return self.sequence.tokens

    @tokens.setter
    def tokens(self, ids: list[int]) -> None:
        self.sequence.tokens = ids

    def new_sequence(self) -> Sequence:
        """An empty sequence with a KV cache of its own, for `ctx_size` tokens: the next free row of the pool
        that the plan counted (`sequences` of them), so that a batch of them attends in one operation; past
        those, a cache of its own, outside the plan."""
        if self._free_rows:
            return Sequence(self.kv_pool.cache(self._free_rows.pop(0)), [])
        return Sequence(KVCache(self.cfg, self.ctx_size, self.dtype, self.device), [])

    def release_sequence(self, seq: Sequence) -> None:
        """Give back a sequence from `new_sequence` that will not be used again: its pool row goes to the next
        one asked for (a cache of its own is simply dropped)."""
        if seq.kv.pool is self.kv_pool and seq is not self.sequence and seq.kv.row not in self._free_rows:
            self._free_rows.append(seq.kv.row)

    @property
    def has_tokenizer(self) -> bool:
        return self._tokenizer is not None

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise TokenizerError(f"{self.folder or 'this model'} has no tokenizer (tokenizer.json or tokenizer.model)")
        return self._tokenizer

    @property
    def stop_ids(self) -> set[int]:
        eos = self.generation_config.get("eos_token_id", self.cfg.eos_token_ids)
        ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        if self._tokenizer is not None and self._tokenizer.eos_id is not None:
            ids.add(self._tokenizer.eos_id)
        return ids

    def _check_ids(self, ids: list[int]) -> None:
        bad = [i for i in ids if not 0 <= i < self.cfg.vocab_size]
        if bad:
            raise MoeLocalError(f"token id {bad[0]} is outside the vocabulary (0..{self.cfg.vocab_size - 1})")
        if len(ids) > self.ctx_size:
            raise MoeLocalError(f"{len(ids)} tokens do not fit the context of {self.ctx_size} tokens (raise --ctx-size)")

    @torch.inference_mode()
    def _forward(self, ids: list[int], pos: int, all_logits: bool, seq: Sequence | None = None) -> torch.Tensor:
        """Feed ids at positions pos.. of `seq` (default: the engine's own) in chunks; logits [T or 1, V]
        fp32 on the CPU."""
        seq, chunk, out = seq or self.sequence, self.options.prefill_chunk, []
        for start in range(0, len(ids), chunk):
            if self.threads:
                self.threads.check()
            tokens = torch.tensor(ids[start : start + chunk])  # on the CPU: `Transformer.embed` places them
            with matmuls_for_rows(len(tokens)):
                hidden = self.model(tokens, pos + start, seq.kv, self.experts)  # [t, D]
            if all_logits:
                out.append(self._logits(hidden))
            seq.tokens = seq.tokens[: pos + start] + ids[start : start + chunk]
        return torch.cat(out) if all_logits else self._logits(hidden[-1:])

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head on final hidden states [T, D] -> fp32 logits [T, V] on the CPU; with the matmul kernel for
        T rows (a vocabulary of 150-200k makes it the largest matmul of a decode step)."""
        with matmuls_for_rows(hidden.shape[0]):
            return self.model.lm_head(hidden).float().cpu()

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """One full forward pass from position 0: float32 [len(token_ids), vocab]."""
        if len(token_ids) == 0:
            raise MoeLocalError("no token ids to evaluate: give at least one")
        self._check_ids(token_ids)
        return self._forward(list(token_ids), 0, all_logits=True)

    def prefill(self, ids: list[int], seq: Sequence | None = None, marks: tuple[int, ...] = ()) -> tuple[torch.Tensor, int]:
        """Bring the KV cache of `seq` (default: the engine's own) to `ids`, reusing the longest prefix it
        already holds (a chat's earlier turns; with linear-attention layers all it holds, or a `Snapshot`'s
        prefix); returns the last position's logits [V] and how many tokens were evaluated. With
        linear-attention layers a snapshot is kept at the end of ids, and on the way at each of `marks`
        (lengths of ids: where the next prompt is likely to leave this one, a chat's end before the answer)."""
        if not ids:
            raise MoeLocalError("the prompt is empty")
        self._check_ids(ids)
        seq = seq or self.sequence
        reuse, snapshot = self._resume(ids, seq)
        if snapshot is not None:
            for state, saved in zip(self._states(seq), snapshot.states):
                state.copy_(saved)
        if seq.kv.can_truncate:
            return self._forward(ids[reuse:], reuse, False, seq)[-1], len(ids) - reuse
        start = reuse
        for end in sorted({m for m in marks if reuse < m < len(ids)} | {len(ids)}):
            logits = self._forward(ids[start:end], start, False, seq)[-1]
            self._snapshot(seq)
            start = end
        return logits, len(ids) - reuse

    def reusable(self, ids: list[int], seq: Sequence) -> int:
        """How many of `ids` `prefill` takes from what `seq` holds: the prefix its cache shares with them (less
        the last id, whose logits are needed); where a layer keeps a recurrent state, all the cache holds or the
        longest snapshot within that prefix; nothing past an overwritten ring."""
        return self._resume(ids, seq)[0]

    def _resume(self, ids: list[int], seq: Sequence) -> tuple[int, Snapshot | None]:
        """Where a prefill of ids on seq starts, and the snapshot it restores first (None: the cache as it is)."""
        held = seq.tokens
        reuse = shared_prefix(ids, held)
        if not seq.kv.can_truncate:
            if reuse == len(held):
                return reuse, None
            # a recurrent state holds all of `held` and cannot be cut back: the longest snapshot within the prefix
            fits = [s for s in seq.snapshots if len(s.ids) <= reuse and held[: len(s.ids)] == s.ids]
            snapshot = max(fits, key=lambda s: len(s.ids), default=None)
            return (0, None) if snapshot is None else (len(snapshot.ids), snapshot)
        rings = [self.cfg.cache_positions(i, self.ctx_size) for i in range(self.cfg.n_layers)]
        ring = min((n for n in rings if n < self.ctx_size), default=0)  # the shortest window a sliding layer keeps
        if ring and max(0, reuse - ring + 1) + ring < len(held):
            reuse = 0  # a sliding layer's ring already holds later positions where the queries after `reuse` look
        return reuse, None

    def _states(self, seq: Sequence) -> list[torch.Tensor]:
        """seq's recurrent states: the cache tensors of its linear-attention layers."""
        return [t for block, layer in zip(self.model.layers, seq.kv.layers) if block.attention.recurrent for t in layer]

    def _snapshot(self, seq: Sequence) -> None:
        """Keep seq's recurrent states after its tokens, with the snapshots still within them (the newest
        SNAPSHOTS - 1)."""
        kept = [s for s in seq.snapshots if len(s.ids) < len(seq.tokens) and seq.tokens[: len(s.ids)] == s.ids]
        states = [t.to("cpu", copy=True) for t in self._states(seq)]  # in host RAM: beside a GPU, outside its plan
        seq.snapshots = kept[-(SNAPSHOTS - 1) :] + [Snapshot(list(seq.tokens), states)]

    def decode_one(self, token: int) -> torch.Tensor:
        """Feed one token after the cached ones; its logits [V]."""
        if len(self.tokens) >= self.ctx_size:  # past the cache: an index_copy_'s device-side assert, a kernel's refusal
            raise MoeLocalError(f"the context of {self.ctx_size} tokens is full")
        if self.static is None:
            return self._forward([token], len(self.tokens), all_logits=False)[-1]
        return self._decode_static(token)

    @torch.inference_mode()
    def _decode_static(self, token: int) -> torch.Tensor:
        self._check_ids([token])
        pos = len(self.sequence.tokens)
        with matmuls_for_rows(1):
            hidden = self.static.step(token, pos, self.experts)
        self.sequence.tokens = self.sequence.tokens + [token]
        return self._logits(hidden)[-1]

    @torch.inference_mode()
    def decode_batch(self, seqs: list[Sequence], tokens: list[int]) -> torch.Tensor:
        """Feed each sequence its next token, all in one forward pass (each MoE layer's experts are fetched
        once for the batch); logits [B, V] fp32 on the CPU."""
        positions = [len(s.tokens) for s in seqs]
        if max(positions) >= self.ctx_size:
            raise MoeLocalError(f"a sequence is full: the context holds {self.ctx_size} tokens")
        caches = [s.kv for s in seqs]
        if self.threads:
            self.threads.check()
        with matmuls_for_rows(len(seqs)):
            hidden = self.model.forward_batch(torch.tensor(tokens), positions, caches, self.experts)  # [B, D]
        for s, token in zip(seqs, tokens):
            s.tokens.append(token)
        return self._logits(hidden)

    def sampling_defaults(self) -> SamplingParams:
        return SamplingParams().from_generation_config(self.generation_config)

    def generate(
        self, prompt: list[int], max_new_tokens: int, params: SamplingParams, stats: GenerationStats | None = None,
        marks: tuple[int, ...] = (),
        constraint: Constraint | None = None,
    ) -> Iterator[int]:
        """`generate.generate` after prompt (`marks`: `prefill`'s; `constraint`: a grammar's, `run --json-schema`)."""
        return generate(self, prompt, max_new_tokens, params, self.stop_ids, stats or GenerationStats(), marks, constraint)


def shared_prefix(ids: list[int], cached: list[int]) -> int:
    """How many of `ids` a cache holding `cached` can keep: their common prefix, but at least the last id
    is evaluated, since its logits are needed."""
    n = 0
    while n < min(len(ids) - 1, len(cached)) and ids[n] == cached[n]:
        n += 1
    return n


def measure_workspace(model: Transformer, fmt: ExpertFormat, ctx_size: int, chunk: int) -> int:
    """Peak CUDA memory a prefill chunk at the end of the context takes beyond the weights and the KV
    cache (one expert's weights stand in for every expert and are not counted), plus the fp32 logits of a
    whole chunk that `Engine.logits` returns."""
    cfg, weight = model.cfg, model.norm.weight  # the compute dtype, on the device
    T = min(chunk, ctx_size)
    kv = KVCache(cfg, ctx_size, weight.dtype, weight.device)
    expert = fmt.blank(weight.device)

    def experts(layer: int, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        chosen = indices.tolist()
        return mix(x, weights, chosen, sorted({e for row in chosen for e in row}), lambda e, xs: fmt.forward(xs, expert))

    torch.cuda.synchronize(weight.device)
    base = torch.cuda.memory_allocated(weight.device)
    torch.cuda.reset_peak_memory_stats(weight.device)
    with torch.inference_mode():
        hidden = model(torch.zeros(T, dtype=torch.long, device=weight.device), ctx_size - T, kv, experts)
        model.lm_head(hidden[-1:]).float()
    torch.cuda.synchronize(weight.device)
    return torch.cuda.max_memory_allocated(weight.device) - base + T * cfg.vocab_size * 4


def read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path.name} is not valid JSON: {e}") from None


def load(
    model: str | os.PathLike,
    device: str | None = None,
    gpu_memory: str | int | None = None,
    progress: Callable[[int, int], None] | None = None,
    **options,
) -> Engine:
    """Load a model folder or a cached Hugging Face id. `options` are the fields of `Options`."""
    known = {f.name for f in fields(Options)}
    unknown = set(options) - known
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; known: {sorted(known)}")
    options = Options(device=device, gpu_memory=gpu_memory, **options)
    return Engine.from_folder(resolve_model_path(model), options, progress)

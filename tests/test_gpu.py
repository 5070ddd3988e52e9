"""CUDA-only behaviour (skipped without a GPU): the CPU reference, the measured workspace, pinned memory."""

from __future__ import annotations

import pytest
import torch

import moe_local
from moe_local.bench import BenchConfig, bench
from moe_local.generate import SamplingParams

pytestmark = pytest.mark.gpu
GREEDY = SamplingParams(temperature=0)


def test_cuda_logits_and_tokens_equal_the_cpu_reference(tiny):
    folder, _ = tiny
    ids = [1, 17, 99, 250, 31, 7, 64]
    cpu = moe_local.load(folder, device="cpu", expert_slots=3)
    cuda = moe_local.load(folder, device="cuda", expert_slots=3)
    want = cpu.logits(ids)
    assert torch.allclose(cuda.logits(ids), want, atol=1e-4 * want.abs().max().item())
    assert list(cuda.generate(ids, 24, GREEDY)) == list(cpu.generate(ids, 24, GREEDY))
    # the token embeddings stay in host RAM (the tiny model's lm_head is its own), and the plan says so
    assert cuda.model.tok_embeddings.weight.device.type == "cpu" and cuda.model.output.weight.is_cuda
    assert cuda.plan.host_resident_bytes == cuda.model.tok_embeddings.weight.nbytes


def test_the_workspace_is_measured_and_a_full_context_prefill_stays_in_budget(tiny):
    folder, _ = tiny
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    engine = moe_local.load(folder, device="cuda", gpu_memory="16MiB", ctx_size=256, prefill_chunk=64)
    plan = engine.plan
    assert plan.workspace_measured and plan.workspace_bytes > 0
    assert engine.store.pinned and engine.experts.stats.host_memory["pageable_bytes"] == 0
    list(engine.generate(list(range(1, 250)), 6, GREEDY))  # fills the context
    assert torch.cuda.max_memory_allocated() - before <= plan.budget_bytes


def test_bench_runs_on_cuda_with_pinned_experts():
    result = bench(BenchConfig(preset="tiny", device="cuda", expert_slots=8, prompt_tokens=64, new_tokens=8, peer_tokens=2))
    assert result["channels"]["pinned"] and result["plan"]["workspace_measured"]
    assert result["same_tokens_in_every_run"]
    assert result["decode_tok_per_s"] > 0 and result["speedup_vs_peer_per_layer"] > 0

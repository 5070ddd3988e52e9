"""The host expert store: chunked allocation, the pinned-memory fallback, and what it reports."""

from __future__ import annotations

import warnings

import pytest
import torch

import moe_local
from moe_local.experts import store as store_module
from moe_local.experts.formats import Dense
from moe_local.experts.store import ExpertStore
from moe_local.generate import SamplingParams
from test_runtime import small_config

CPU = torch.device("cpu")


def numbered(cfg, layer: int, expert: int, w: str) -> torch.Tensor:
    """A source tensor whose values say where it belongs."""
    shape = (cfg.dim, cfg.ffn_dim) if w == "w2" else (cfg.ffn_dim, cfg.dim)
    return torch.full(shape, 100.0 * layer + 10 * expert + int(w[1]))


def test_experts_are_allocated_in_chunks_and_each_lands_in_its_own_buffer():
    cfg = small_config()  # 2 layers x 4 experts
    store = ExpertStore(cfg, Dense(cfg, torch.float32), pin=False, chunk_bytes=3 * Dense(cfg, torch.float32).expert_bytes + 5)
    reported = []
    store.fill_from(lambda *key: numbered(cfg, *key), CPU, lambda done, total: reported.append((done, total)))
    assert [chunk.shape[0] for chunk in store.chunks] == [3, 3, 2]
    assert reported[-1] == (store.total_bytes, store.total_bytes) and len(reported) == 8
    for layer in range(2):
        for expert in range(4):
            w = store.format.unpack(store.buffer((layer, expert)))
            gate_up, down = w["gate_up"], w["down"]
            base = 100.0 * layer + 10 * expert
            assert store.buffer((layer, expert)).is_contiguous()
            assert torch.all(gate_up[: cfg.ffn_dim] == base + 1) and torch.all(gate_up[cfg.ffn_dim :] == base + 3)
            assert torch.all(down == base + 2)
    assert store.memory() == {"pinned_bytes": 0, "pageable_bytes": store.total_bytes, "chunks": 3}


def test_a_failed_pin_falls_back_to_pageable_memory_with_one_warning(monkeypatch):
    """Pinning works for the first chunk, then fails (as a locked-memory limit makes it): the rest is
    pageable, one warning says so, and the store reports how much of each it holds."""
    real_empty = torch.empty
    calls = []

    def empty(*args, pin_memory=False, **kwargs):
        if pin_memory:
            calls.append(args)
            if len(calls) > 1:
                raise RuntimeError("CUDA error: out of memory\nmore detail")
            pin_memory = torch.cuda.is_available()  # a real pin where one is possible
        return real_empty(*args, pin_memory=pin_memory, **kwargs)

    monkeypatch.setattr(store_module.torch, "empty", empty)
    cfg = small_config()
    store = ExpertStore(cfg, Dense(cfg, torch.float32), pin=True, chunk_bytes=2 * Dense(cfg, torch.float32).expert_bytes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store.fill_from(lambda *key: numbered(cfg, *key), CPU)
    assert len(calls) == 2  # after the failure nothing tries to pin again
    assert len(caught) == 1 and "could not pin" in str(caught[0].message) and "\n" not in str(caught[0].message)
    assert store.memory()["pinned_bytes"] == 2 * store.expert_bytes
    assert store.memory()["pageable_bytes"] == 6 * store.expert_bytes
    assert store.is_pinned((0, 1)) and not store.is_pinned((0, 2)) and not store.pinned
    assert torch.all(store.format.unpack(store.buffer((1, 3)))["down"] == 132)


def test_a_cpu_only_torch_cannot_pin_and_says_so():
    if torch.cuda.is_available():
        pytest.skip("this torch can pin")
    cfg = small_config()
    store = ExpertStore(cfg, Dense(cfg, torch.float32), pin=True)
    with pytest.warns(UserWarning, match="could not pin"):
        store.fill_from(lambda *key: numbered(cfg, *key), CPU)
    assert store.memory()["pinned_bytes"] == 0


@pytest.mark.gpu
def test_cuda_output_is_the_same_with_pageable_experts(tiny, monkeypatch):
    """The pageable fallback changes how experts are copied, never what the model computes."""
    folder, _ = tiny
    greedy = SamplingParams(temperature=0)
    pinned = moe_local.load(folder, device="cuda", expert_slots=3)
    assert pinned.store.pinned
    want = list(pinned.generate([1, 10, 20, 30], 16, greedy))
    real_empty = torch.empty

    def empty(*args, pin_memory=False, **kwargs):
        if pin_memory:
            raise RuntimeError("simulated: cannot lock more memory")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(store_module.torch, "empty", empty)
    with pytest.warns(UserWarning, match="could not pin"):
        pageable = moe_local.load(folder, device="cuda", expert_slots=3)
    assert pageable.store.memory()["pinned_bytes"] == 0
    assert list(pageable.generate([1, 10, 20, 30], 16, greedy)) == want

"""Loading: model folders, Hugging Face cache ids, and a clear error for every damaged input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moe_local
from moe_local.budget import format_bytes, parse_size, plan_memory
from moe_local.checkpoint import Checkpoint
from moe_local.errors import BudgetError, CheckpointError, ConfigError


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("model-*.safetensors"))


def test_missing_path_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        moe_local.load(tmp_path / "nowhere", device="cpu")


def test_uncached_hub_id_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="Hugging Face cache"):
        moe_local.load("mistralai/Mixtral-8x7B-v0.1", device="cpu")


def test_hub_id_resolves_to_the_snapshot_in_the_cache(tiny, tmp_path, monkeypatch):
    folder, _ = tiny
    repo = tmp_path / "hub" / "models--org--tiny-mixtral"
    snapshot = repo / "snapshots" / "abc123"
    blobs = repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in folder.iterdir():  # the hub cache stores files as blobs linked from the snapshot
        shutil.copy(f, blobs / f.name)
        (snapshot / f.name).symlink_to(blobs / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    engine = moe_local.load("org/tiny-mixtral", device="cpu")
    assert engine.folder == snapshot
    assert torch.equal(engine.logits([1, 5, 9]), moe_local.load(folder, device="cpu").logits([1, 5, 9]))


def test_missing_shard_is_named(tiny_sharded, tmp_path):
    folder = copy_model(tiny_sharded[0], tmp_path / "m")
    victim = shard_files(folder)[2]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"shard {victim.name} .* is missing"):
        moe_local.load(folder, device="cpu")


def test_truncated_shard_is_named_in_the_error(tiny_sharded, tmp_path):
    folder = copy_model(tiny_sharded[0], tmp_path / "m")
    victim = shard_files(folder)[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"shard {victim.name} is truncated: expected {len(data):,} bytes"):
        moe_local.load(folder, device="cpu")


@pytest.mark.parametrize("damage", [b"\x00" * 4, b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!", b"\xff" * 64])
def test_corrupt_shard_is_named_in_the_error(tiny, tmp_path, damage):
    folder = copy_model(tiny[0], tmp_path / "m")
    (folder / "model.safetensors").write_bytes(damage)
    with pytest.raises(CheckpointError, match="shard model.safetensors is (corrupt|truncated)"):
        moe_local.load(folder, device="cpu")


def test_unknown_model_type_lists_the_supported_ones(tiny, tmp_path):
    folder = copy_model(tiny[0], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama4"}))
    with pytest.raises(ConfigError, match="unsupported model_type 'llama4'.*mixtral"):
        moe_local.load(folder, device="cpu")


def test_config_that_disagrees_with_the_tensors_names_the_tensor(tiny, tmp_path):
    folder = copy_model(tiny[0], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    with pytest.raises(CheckpointError, match=r"experts\.0\.w1\.weight .* has shape \[96, 64\] but config.json implies \[128, 64\]"):
        moe_local.load(folder, device="cpu")


def test_config_with_more_layers_than_the_checkpoint_names_the_missing_tensor(tiny, tmp_path):
    folder = copy_model(tiny[0], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 4}))
    with pytest.raises(CheckpointError, match="lacks tensor model.layers.3"):
        moe_local.load(folder, device="cpu")


def test_unknown_tensor_is_an_error(tiny, tmp_path):
    folder = copy_model(tiny[0], tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.mystery.weight"] = torch.zeros(2)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="unknown tensor model.mystery.weight"):
        moe_local.load(folder, device="cpu")


def test_missing_config_and_missing_weights_are_clear(tiny, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        moe_local.load(empty, device="cpu")
    shutil.copy(tiny[0] / "config.json", empty / "config.json")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        moe_local.load(empty, device="cpu")


def test_checkpoint_reads_lazily_without_loading_every_tensor(tiny_sharded):
    ckpt = Checkpoint(tiny_sharded[0])
    assert ckpt.dtype == torch.float32
    assert len(ckpt._files) == 0  # validation reads headers only
    ckpt.get("model.layers.1.block_sparse_moe.experts.3.w2.weight")
    assert len(ckpt._files) == 1


def test_budget_strings_parse_like_accelerate():
    assert parse_size("12GiB") == 12 * 2**30
    assert parse_size("12GB") == 12 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("4096B") == parse_size(4096) == 4096
    with pytest.raises(BudgetError, match="has no unit"):  # `--gpu-memory 12` is never 12 bytes
        parse_size("4096")
    with pytest.raises(BudgetError, match="cannot read memory size '12 apples'"):
        parse_size("12 apples")


def test_budget_decides_the_number_of_slots(tiny):
    cfg = Checkpoint(tiny[0]).config
    cpu = torch.device("cpu")
    base = plan_memory(cfg, torch.float32, cpu, 256, 512, expert_slots=1)
    for n in (1, 5, 24):
        plan = plan_memory(cfg, torch.float32, cpu, 256, 512, gpu_memory=base.fixed_bytes + n * base.expert_bytes + 7)
        assert plan.expert_slots == n
    huge = plan_memory(cfg, torch.float32, cpu, 256, 512, gpu_memory="10GiB")
    assert huge.expert_slots == huge.total_experts == 24


def test_budget_smaller_than_the_resident_part_says_the_minimum(tiny):
    folder, _ = tiny
    plan = plan_memory(Checkpoint(folder).config, torch.float32, torch.device("cpu"), 512, 512, expert_slots=1)
    with pytest.raises(BudgetError, match="too small.*need at least") as err:
        moe_local.load(folder, device="cpu", gpu_memory="100KiB", ctx_size=512)
    assert format_bytes(plan.fixed_bytes + plan.expert_bytes) in str(err.value)


def test_loaded_engine_uses_the_planned_number_of_slots(tiny):
    folder, _ = tiny
    plan = plan_memory(Checkpoint(folder).config, torch.float32, torch.device("cpu"), 512, 512, expert_slots=1)
    engine = moe_local.load(folder, device="cpu", ctx_size=512, gpu_memory=plan.fixed_bytes + 5 * plan.expert_bytes)
    assert engine.plan.expert_slots == 5
    assert engine.experts.cache.slots.shape[0] == 5


def test_bad_expert_slot_counts_are_refused(tiny):
    with pytest.raises(BudgetError, match="between 1 and 24"):
        moe_local.load(tiny[0], device="cpu", expert_slots=0)
    with pytest.raises(BudgetError, match="between 1 and 24"):
        moe_local.load(tiny[0], device="cpu", expert_slots=25)

"""`moe-local info`: what a checkpoint holds, from its config.json and safetensors headers alone."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

import moe_local.checkpoint
from conftest import TINY, moe_local_cli
from moe_local.cli import main

DEMO = Path(__file__).parent.parent / "moe_local" / "demo"
EXPERT = re.compile(r"model\.layers\.\d+\.block_sparse_moe\.experts\.\d+\.")


def tensor_sizes(folder: Path) -> dict[str, int]:
    """Tensor name -> number of elements, as the safetensors library reads the shards."""
    sizes = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            sizes.update({name: math.prod(f.get_slice(name).get_shape()) for name in f.keys()})
    return sizes


def expected_parameters(folder: Path, n_layers: int, top_k: int) -> dict[str, int]:
    sizes = tensor_sizes(folder)
    resident = sum(n for name, n in sizes.items() if not EXPERT.match(name))
    one_expert = sum(n for name, n in sizes.items() if name.startswith("model.layers.0.block_sparse_moe.experts.0."))
    return {
        "total": sum(sizes.values()),
        "active_per_token": resident + n_layers * top_k * one_expert,
        "active_without_embeddings": resident + n_layers * top_k * one_expert - sizes["model.embed_tokens.weight"],
        "resident": resident,
        "routed_experts": sum(sizes.values()) - resident,
        "per_expert": one_expert,
        "dense_and_shared_mlp": 0,  # Mixtral has neither
    }


def test_info_json_counts_match_the_checkpoint_tensors(tiny_bf16):
    folder, _ = tiny_bf16
    result = moe_local_cli("info", str(folder), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    parameters = expected_parameters(folder, TINY["num_hidden_layers"], TINY["num_experts_per_tok"])
    assert info["parameters"] == parameters
    assert info["expert_bytes"] == 2 * parameters["per_expert"]  # bf16
    assert info["dtype"] == "bfloat16" and info["architecture"] == "MixtralForCausalLM"
    assert (info["layers"], info["experts_per_layer"], info["experts_per_token"]) == (3, 8, 2)
    assert (info["hidden_size"], info["expert_ffn_size"], info["kv_heads"]) == (64, 96, 2)
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(shards) <= set(info["files"])
    assert info["files"]["model.safetensors.index.json"] == (folder / "model.safetensors.index.json").stat().st_size


def test_info_shows_the_demo_model_by_default():
    result = moe_local_cli("info")
    assert result.returncode == 0, result.stderr
    config = json.loads((DEMO / "config.json").read_text())
    parameters = expected_parameters(DEMO, config["num_hidden_layers"], config["num_experts_per_tok"])
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in result.stdout.splitlines() if "  " in line.strip())
    assert rows["model"] == str(DEMO)
    assert rows["architecture"] == "MixtralForCausalLM (mixtral)"
    assert f"({parameters['total']:,}) total" in rows["parameters"]
    active = parameters["active_per_token"]
    assert rows["active per token"].startswith(f"{active / 1e6:.2f} M ({active:,}): resident")
    assert f"({parameters['per_expert']:,}) parameters" in rows["expert size"]
    assert rows["dtype"] == "bfloat16"
    assert rows["model.safetensors"] == f"{(DEMO / 'model.safetensors').stat().st_size / 2**20:.2f} MiB"


def test_info_reads_no_tensor_data(tiny, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("info must not read tensor data")

    monkeypatch.setattr(moe_local.checkpoint.Checkpoint, "get", refuse)  # every tensor read goes through it
    monkeypatch.setattr(sys, "argv", ["moe-local", "info", str(tiny[0]), "--json"])
    with pytest.raises(SystemExit) as exit:
        main()
    out, err = capsys.readouterr()
    assert exit.value.code == 0, err
    assert json.loads(out)["parameters"]["total"] == sum(tensor_sizes(tiny[0]).values())

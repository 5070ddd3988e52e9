"""Fixtures that build tiny random Mixtral checkpoints with `transformers` and real tokenizers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from builders import train_tokenizer
from moe_local import native

# A fixed thread count (torch's, for the subprocesses too), where moe-local would re-choose it from the machine's
# load as an engine works (moe_local/threads.py): fp32 sums can round otherwise on another count, and tests compare
# runs bit for bit. tests/test_threads.py unsets it where it tests the choice.
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))

# Small, but with every feature that matters: GQA, several layers, 8 experts with top-2 routing.
TINY = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=512,
    initializer_range=0.1,  # larger than the default so logits and routing are far from uniform
)


def build_mixtral(
    folder: Path,
    tokenizer_dir: Path | None,
    dtype: torch.dtype = torch.float32,
    sharded: bool = False,
    seed: int = 0,
    **overrides,
) -> MixtralForCausalLM:
    """Save a random MixtralForCausalLM (and copy in a trained tokenizer); return the reference model,
    loaded back as a user would (`.to(bf16)` would also round the RoPE frequencies, loading does not)."""
    torch.manual_seed(seed)
    model = MixtralForCausalLM(MixtralConfig(**{**TINY, **overrides})).to(dtype)
    model.save_pretrained(folder, max_shard_size="100KB" if sharded else "1GB")
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            shutil.copy(f, folder / f.name)
    return reference_model(folder, dtype)


def reference_model(folder: Path, dtype: torch.dtype) -> MixtralForCausalLM:
    return MixtralForCausalLM.from_pretrained(folder, dtype=dtype).eval()


@pytest.fixture(scope="session", autouse=True)
def quantized_cache(tmp_path_factory) -> Path:
    """Quantized experts are cached on disk: keep the tests' out of the user's ~/.cache, in pytest's own
    temporary folder (subprocesses inherit the variable)."""
    folder = tmp_path_factory.mktemp("moe-local-cache")
    previous = os.environ.get("MOE_LOCAL_CACHE")
    os.environ["MOE_LOCAL_CACHE"] = str(folder)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)
    if previous is None:
        os.environ.pop("MOE_LOCAL_CACHE", None)
    else:
        os.environ["MOE_LOCAL_CACHE"] = previous


@pytest.fixture
def rebuilt():
    """moe-local's CPU kernels looked up afresh (the environment decides), and afresh again after the test."""
    native.library.cache_clear()
    yield
    native.library.cache_clear()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(folder, vocab_size=TINY["vocab_size"])
    return folder


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, tokenizer_dir):
    """(folder, reference model): fp32, one safetensors file."""
    folder = tmp_path_factory.mktemp("tiny")
    return folder, build_mixtral(folder, tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_sharded(tmp_path_factory, tokenizer_dir):
    folder = tmp_path_factory.mktemp("tiny_sharded")
    return folder, build_mixtral(folder, tokenizer_dir, sharded=True, seed=1)


@pytest.fixture(scope="session")
def tiny_bf16(tmp_path_factory, tokenizer_dir):
    folder = tmp_path_factory.mktemp("tiny_bf16")
    return folder, build_mixtral(folder, tokenizer_dir, dtype=torch.bfloat16, sharded=True, seed=2)


def moe_local_cli(*args: str, input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed command line as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "moe_local", *args], capture_output=True, text=True, input=input, env=env, timeout=300
    )


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request) -> str:
    """Every engine test runs on the CPU; on a machine with a GPU it runs on CUDA too."""
    return request.param

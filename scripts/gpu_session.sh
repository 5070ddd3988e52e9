#!/usr/bin/env bash
# One call on a lent GPU machine: the GPU tests, then the benchmarks recorded in docs/measurements.md.
# Usage (device tool): bash scripts/gpu_session.sh [STEP ...]   (default: every step). Output under $OUT (or
# ./gpu-out), a file per step and steps.txt; DEADLINE=SECONDS ends it in time, cutting the step that runs
# over; TESTS: which test files (default: tests/). Steps, in the order they run: machine tests mxfp4 ggml_kernel qwen3
# mixtral qwen36 qwen3_fp8 batch pageable mixtral_never mixtral_int4_attention gpt_oss_20b gpt_oss_120b
# gpt_oss_never mixtral_bf16 deepseek_v3_fp8 minimax_m2_fp8 (more than 15 minutes in all: with a 15-minute
# lease, name the steps that matter most, or let DEADLINE cut the last ones)
# The H100 machine of 2026-11-26 had pytest and pytest-xdist. One without pytest: unpack its wheels (pytest,
# pluggy, iniconfig, packaging: `pip download --no-deps --python-version 3.12 ...` then `python -m zipfile -e
# WHEEL .gpu_deps/`) into .gpu_deps/ (git-ignored) and pass it to the device tool with carry: [".gpu_deps"].
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=".:.gpu_deps${PYTHONPATH:+:$PYTHONPATH}"
STEPS=${*:-machine tests mxfp4 ggml_kernel qwen3 mixtral qwen36 qwen3_fp8 batch pageable mixtral_never mixtral_int4_attention gpt_oss_20b gpt_oss_120b gpt_oss_never mixtral_bf16 deepseek_v3_fp8 minimax_m2_fp8}
step() {  # step NAME SECONDS COMMAND...: run with a time limit, output to $OUT/NAME.txt
    local name=$1 limit=$2; shift 2
    case " $STEPS " in *" $name "*) ;; *) return ;; esac
    local left=$((${DEADLINE:-100000} - SECONDS))  # DEADLINE: seconds for the whole script
    if ((left < 15)); then echo "$name: skipped, out of time" | tee -a "$OUT/steps.txt"; return; fi
    ((limit > left)) && limit=$left
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    echo "$name: exit $? in $((SECONDS - start)) s" | tee -a "$OUT/steps.txt"
}
BENCH="python -m moe_local bench --peer-layers 0 --no-compare-prefetch --policy layer-lru"
step machine 30 bash -c 'nvidia-smi; python -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"'
# pytest-xdist, where the machine has it, runs the GPU tests four at a time
# the tests step holds test_ggml's test_on_cuda_experts_in_slots_compute_exactly_on_the_files_values: a GGUF's experts (every
# ggml type Ggml keeps) by ggml_triton's kernels, until then run only in Triton's interpreter (TESTS=tests/test_ggml.py: it alone)
XDIST=$(python -c "import xdist" 2>/dev/null && echo "-n 4")
step tests 240 python -m pytest -q -m gpu -p no:cacheprovider --maxfail=10 --continue-on-collection-errors --ignore=tests/test_server.py $XDIST ${TESTS:-tests/}  # (the server tests need openai, not there; none is a GPU test)
step mxfp4 60 python -c "
from moe_local.experts.mxfp4_triton import benchmark_decode
for n, k in ((2880, 2880), (5760, 2880)):
    print(n, k, {key: round(v, 2) for key, v in benchmark_decode(n, k).items()})"
# a GGUF's experts on CUDA (ggml_triton, never timed): a token's 8 experts per matrix at Qwen3-30B-A3B's widths, each type,
# against the time to read their bytes, and widening a gate_up for prefill
step ggml_kernel 120 python scripts/ggml_kernel_gpu.py
# --cuda-graphs: one more run with each layer's resident work replayed as a CUDA graph (graphs.py)
step qwen3 240 $BENCH --preset qwen3-30b-a3b --experts-dtype int4 --gpu-memory 8GiB --new-tokens 64 --cuda-graphs
step mixtral 150 $BENCH --experts-dtype int4 --gpu-memory 12GiB --new-tokens 64 --cuda-graphs
# issue 24's GPU target: the Qwen3.6 hybrid (3 of 4 layers Gated DeltaNet, 256 experts of 512, top 8) >= 60 tok/s
step qwen36 240 $BENCH --preset qwen3.6-35b-a3b --experts-dtype int4 --gpu-memory 8GiB --new-tokens 64 --cuda-graphs
# issue 26: fp8 experts (as FP8 checkpoints publish them; a token's experts in one Triton launch per matrix,
# never run on a GPU: the tests step checks it first, test_fp8's test_fp8_experts_on_cuda_match_transformers in
# every family's published layout) at Qwen3-30B-A3B's geometry @8GiB. torch._scaled_mm for GPUs with FP8 tensor
# cores (sm89+) is not written: it would take the activations to FP8 too (a second rounding), so it is to be
# written and measured against this kernel on such a machine, not before
step qwen3_fp8 240 $BENCH --preset qwen3-30b-a3b --experts-dtype fp8 --gpu-memory 8GiB --new-tokens 64
# issue 15's GPU target: 8 sequences decoded together >= 4x one, Mixtral int4 @ 12GiB
step batch 150 $BENCH --experts-dtype int4 --gpu-memory 12GiB --new-tokens 32 --prompt-tokens 64 --batch 8
# issue 13: a consumer link (pageable memory), the CPU channel against copies alone, Mixtral int4 (the CPU
# channel reads CUDA's int4 layout since the seventh session); 8 layers at 3GiB (a quarter of 32 at 12GiB)
step pageable 240 bash -c "$BENCH --experts-dtype int4 --gpu-memory 3GiB --layers 8 --new-tokens 32 --pageable --cpu-experts never && $BENCH --experts-dtype int4 --gpu-memory 3GiB --layers 8 --new-tokens 32 --pageable --cpu-experts auto"
# the mixtral step's setup with copies alone: what the int4 CPU channel adds on pinned memory
step mixtral_never 150 $BENCH --experts-dtype int4 --gpu-memory 12GiB --new-tokens 64 --cuda-graphs --cpu-experts never
# the attention in int4 (eighth session, never run on a GPU): 118 int4 slots at 12GiB where bf16 attention leaves 97 (the plan)
step mixtral_int4_attention 150 $BENCH --experts-dtype int4 --gpu-memory 12GiB --new-tokens 64 --cuda-graphs --resident-dtype int4
step gpt_oss_20b 120 $BENCH --preset gpt-oss-20b --gpu-memory 8GiB --new-tokens 32
step gpt_oss_120b 260 $BENCH --preset gpt-oss-120b --gpu-memory 24GiB --new-tokens 32 --cuda-graphs
# the same without the CPU channel, whose share of the misses moved with its measured speed (9 to 25 a token)
step gpt_oss_never 260 $BENCH --preset gpt-oss-120b --gpu-memory 24GiB --new-tokens 32 --cuda-graphs --cpu-experts never
# issue 13's bf16 target: Mixtral at 24GiB; 8 layers at 6GiB (a quarter of each), ms/layer gives the 32-layer speed
step mixtral_bf16 150 $BENCH --experts-dtype bf16 --gpu-memory 6GiB --layers 8 --new-tokens 32
# issue 26's fp8 rows for the big presets, a slice of their layers (the whole models' fp8 experts would not fit
# in 128 GB of RAM: DeepSeek-V3's are ~330 GB, MiniMax-M2's ~210 GB); ms a layer gives the whole model's
step deepseek_v3_fp8 240 $BENCH --preset deepseek-v3 --experts-dtype fp8 --gpu-memory 24GiB --layers 8 --new-tokens 32
step minimax_m2_fp8 240 $BENCH --preset minimax-m2 --experts-dtype fp8 --gpu-memory 24GiB --layers 16 --new-tokens 32

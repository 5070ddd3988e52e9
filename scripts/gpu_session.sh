#!/usr/bin/env bash
# One call on a lent GPU machine: the GPU tests, then the benchmarks recorded in docs/benchmarks.md.
# Usage (device tool): bash scripts/gpu_session.sh   (writes everything under $OUT, or ./gpu-out)
# The GPU machine has no pytest: a folder .gpu_deps/ with pytest unpacked (see docs/benchmarks.md) is
# put on PYTHONPATH when present.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=".:.gpu_deps${PYTHONPATH:+:$PYTHONPATH}"
step() {  # step NAME SECONDS COMMAND...: run with a time limit, output to $OUT/NAME.txt
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    echo "$name: exit $? in $((SECONDS - start)) s" | tee -a "$OUT/steps.txt"
}
step machine 30 bash -c 'nvidia-smi; python -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"'
step pytest_gpu 200 python -m pytest -q -m gpu -p no:cacheprovider --maxfail=10 tests/
step mxfp4_decode 60 python -c "
from moe_local.experts.mxfp4_triton import benchmark_decode
for n, k in ((2880, 2880), (5760, 2880)):
    print(n, k, {key: round(v, 2) for key, v in benchmark_decode(n, k).items()})"
step bench_qwen3_int4_8GiB 180 python -m moe_local bench --preset qwen3-30b-a3b --experts-dtype int4 --gpu-memory 8GiB --new-tokens 64 --peer-layers 0 --no-compare-prefetch --policy layer-lru
step bench_mixtral_int4_12GiB 110 python -m moe_local bench --experts-dtype int4 --gpu-memory 12GiB --new-tokens 64 --peer-layers 0 --no-compare-prefetch --policy layer-lru

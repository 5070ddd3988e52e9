"""On a GPU: `ggml_triton.linear_grouped` (a decode token's experts, one launch per matrix) at a model's widths, for
each ggml type, against the time to read the experts' bytes at the device's copy bandwidth; and `widen` (a
prefill's matrix in bf16). Device time from CUDA graphs (`mxfp4_triton._graph_us`: the host's launches do not
count); each call reads other slots of a pool larger than L2, as a decode step reads its experts from memory. The
blocks are random bytes: the arithmetic, and so the time, does not depend on the values. Written without a GPU
(never run yet): `scripts/gpu_session.sh`'s ggml_kernel step runs it.

Usage: python scripts/ggml_kernel_gpu.py [--dim 2048 --ffn 768 --top-k 8]   (Qwen3-30B-A3B's widths by default)
"""

from __future__ import annotations

import argparse

import torch

from moe_local.experts import ggml_triton
from moe_local.experts.formats import aligned
from moe_local.experts.mxfp4_triton import _copy_bandwidth, _graph_us
from moe_local.weights import ggml

POOL_BYTES = 256 << 20  # each type's pool: well over an H100/H200's 50-60 MB of L2


def bench(qtype, dim: int, ffn: int, top_k: int, x: torch.Tensor, timer) -> dict[str, float]:
    """Microseconds per call of each matrix for `top_k` experts of `qtype` ([2 ffn, dim] gate_up and [dim, ffn] down,
    a slot each: the two type bytes, then the matrices), and of widening one gate_up."""
    gate_up, down = 2 * ffn * ggml.row_bytes(qtype, dim), dim * ggml.row_bytes(qtype, ffn)
    down_at = aligned(256 + gate_up)
    stride = down_at + aligned(down)
    slots = max(2 * top_k, POOL_BYTES // stride // top_k * top_k)
    pool = torch.randint(0, 256, (slots, stride), dtype=torch.uint8, device=x.device)
    pool[:, :2] = int(qtype)
    flat, h = pool.view(-1), torch.randn(top_k, ffn, dtype=x.dtype, device=x.device)
    groups = [torch.arange(i, i + top_k, device=x.device) for i in range(0, slots, top_k)]  # each call other slots
    return {
        "gate_up_us": timer([lambda s=s: ggml_triton.linear_grouped(x, flat[256:], flat, s, stride, 2 * ffn) for s in groups]),
        "down_us": timer([lambda s=s: ggml_triton.linear_grouped(h, flat[down_at:], flat[1:], s, stride, dim) for s in groups]),
        "bytes": top_k * (gate_up + down),
        "widen_gate_up_us": timer([lambda i=i: ggml_triton.widen(pool[i, 256:], pool[i], 2 * ffn, dim, x.dtype) for i in range(min(8, slots))]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=768)
    parser.add_argument("--top-k", type=int, default=8)
    args = parser.parse_args()
    device = torch.device("cuda")
    bandwidth = _copy_bandwidth(device)
    x = torch.randn(1, args.dim, dtype=torch.bfloat16, device=device)
    print(f"{torch.cuda.get_device_name()}, copy bandwidth {bandwidth / 1e9:.0f} GB/s; dim {args.dim}, ffn {args.ffn}, {args.top_k} experts, bf16 x")
    print(f"{'type':8} {'gate_up us':>10} {'down us':>8} {'read us':>8} {'ratio':>6} {'widen us':>9}")
    for qtype in ggml_triton.TYPES:
        r = bench(qtype, args.dim, args.ffn, args.top_k, x, _graph_us)
        read_us = r["bytes"] / bandwidth * 1e6
        ratio = (r["gate_up_us"] + r["down_us"]) / read_us
        print(f"{qtype.name:8} {r['gate_up_us']:10.1f} {r['down_us']:8.1f} {read_us:8.1f} {ratio:6.1f} {r['widen_gate_up_us']:9.1f}", flush=True)


if __name__ == "__main__":
    main()

"""One Gated DeltaNet layer's decode step on the CPU after its input projections: moe-local's `deltanet_step`
(`cpu_deltanet.Step`) against transformers' torch functions (`causal_conv1d_update`,
`torch_recurrent_gated_delta_rule`, the gated RMSNorm), at Qwen3.6-35B-A3B's widths (16 key heads, 32 value
heads of 128, conv kernel 4), random weights and states, blocks of steps alternating between the two. With
--layer, the whole block instead: `model.LinearAttention` of the qwen3.6-35b-a3b preset (its bf16 projections
included) through `cpu_deltanet.Fused` against its own torch operations, under `matmuls_for_rows` as the
engine runs a decode step.

    python scripts/deltanet_step_ab.py --rows 1 4 --threads 2
    python scripts/deltanet_step_ab.py --rows 1 4 --threads 2 --layer

Prints one line per row count: the medians a layer and their ratio."""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as qwen

from moe_local import cpu_deltanet

HK, HV, DK, DV, KERNEL = 16, 32, 128, 128, 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4], help="sequences a step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--steps", type=int, default=20, help="steps a block")
    parser.add_argument("--layer", action="store_true", help="the whole LinearAttention block, projections included")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.layer:
        return layer_ab(args)
    C, dtype = 2 * HK * DK + HV * DV, torch.bfloat16
    conv_weight = (torch.randn(C, KERNEL) * 0.5).to(dtype)
    A_log, dt_bias = torch.rand(HV).mul(16).clamp(min=0.01).log(), torch.randn(HV).to(dtype)
    norm = qwen.Qwen3_5MoeRMSNormGated(DV).to(dtype)
    step = cpu_deltanet.Step.build(HK, HV, DK, DV, conv_weight, A_log, dt_bias, norm.weight, norm.variance_epsilon, KERNEL - 1)
    assert step is not None, "the kernels are unavailable here"
    for B in args.rows:
        qkv, z, b, a = (torch.randn(B, n).to(dtype) for n in (C, HV * DV, HV, HV))
        conv_states, states = torch.randn(B, C, KERNEL - 1).to(dtype), torch.randn(B, HV, DK, DV) * 0.1

        def torch_step():
            x = qwen.causal_conv1d_update(qkv[:, :, None], conv_states, conv_weight, None, "silu").transpose(1, 2)
            q, k, v = x.split([HK * DK, HK * DK, HV * DV], dim=-1)
            g = -A_log.float().exp() * F.softplus(a.float() + dt_bias)
            o, new = qwen.torch_recurrent_gated_delta_rule(
                q.reshape(B, 1, HK, DK), k.reshape(B, 1, HK, DK), v.reshape(B, 1, HV, DV), g=g[:, None], beta=b.sigmoid()[:, None],
                initial_state=states, output_final_state=True, use_qk_l2norm_in_kernel=True,
            )  # fmt: skip
            states.copy_(new)
            return norm(o.reshape(-1, DV), z.reshape(-1, DV)).reshape(B, -1)

        def kernel_step():
            return step(qkv, z, b, a, list(conv_states.unbind()), list(states.unbind()))

        times: dict[str, list[float]] = {"torch": [], "kernel": []}
        for _ in range(args.blocks):
            for name, run in (("torch", torch_step), ("kernel", kernel_step)):
                start = time.perf_counter()
                for _ in range(args.steps):
                    run()
                times[name].append((time.perf_counter() - start) / args.steps * 1e6)
        t, k = statistics.median(times["torch"]), statistics.median(times["kernel"])
        print(f"{B} row(s): torch {t:.0f} us, kernel {k:.0f} us a layer: {t / k:.1f}x")


def layer_ab(args) -> None:
    from moe_local.config import preset_config
    from moe_local.cpu_matmul import matmuls_for_rows
    from moe_local.model import LinearAttention

    cfg = preset_config("qwen3.6-35b-a3b")
    layer = min(cfg.linear_layers)
    attention = LinearAttention(cfg, layer)
    with torch.no_grad():
        for p in attention.parameters():
            p.copy_(torch.randn(p.shape) * (p.shape[-1] ** -0.5 if p.dim() > 1 else 0.5))
    attention = attention.to(torch.bfloat16).eval()
    assert attention.fuse(), "the kernels are unavailable here"
    fused = attention.fused
    shapes, dtypes = LinearAttention.cache_shapes(cfg, 64, layer), LinearAttention.cache_dtypes(torch.bfloat16)
    for B in args.rows:
        caches = [tuple(torch.zeros(s, dtype=d) for s, d in zip(shapes, dtypes)) for _ in range(B)]
        x = torch.randn(B, cfg.dim).to(torch.bfloat16)
        times: dict[str, list[float]] = {"torch": [], "kernel": []}
        with torch.inference_mode():
            for _ in range(args.blocks):
                for name in ("torch", "kernel"):
                    attention.fused = fused if name == "kernel" else None
                    start = time.perf_counter()
                    with matmuls_for_rows(B):
                        for _ in range(args.steps):
                            attention.forward_batch(x, None, None, caches, [5] * B) if B > 1 else attention(x, None, None, caches[0], 5)
                    times[name].append((time.perf_counter() - start) / args.steps * 1e6)
        t, k = statistics.median(times["torch"]), statistics.median(times["kernel"])
        print(f"{B} row(s), the whole block: torch {t:.0f} us, kernel {k:.0f} us a layer: {t / k:.2f}x")


if __name__ == "__main__":
    main()

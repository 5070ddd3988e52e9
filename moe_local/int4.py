"""Weight-only int4 in groups along the input dimension, each group with a bf16 scale and zero point
(w ~ (q - 8) * scale + zero, q in 0..15: torch's convention), in the layout of the device's kernel: CUDA's
tensor-core tiles (`_weight_int4pack_mm`) or the CPU's packed rows (`_weight_int4pack_mm_for_cpu`; for a
decode step's few rows, moe-local's own kernel: `native.py`). The experts' int4 format (`experts/formats.py`)
packs the same two tensors into its buffer; `Int4Linear` is what `--resident-dtype int4` puts in place of
the attention projections."""

from __future__ import annotations

import torch
from torch import nn

from moe_local import native
from moe_local.errors import ConfigError

GROUPS = (128, 64, 32)  # the group sizes `group_for` picks from, largest first
KERNEL_MAX_ROWS = 16  # rows one `int4_linear` call takes (a decode step's; a prefill's are several calls)


def inner_k_tiles(k: int) -> int:
    """CUDA's layout: tiles of 16 k, as many side by side as divide k (of 8, 4, 2)."""
    return next(t for t in (8, 4, 2) if k % (t * 16) == 0)


def group_for(shapes: list[tuple[int, int]], device_type: str) -> int:
    """The largest of GROUPS that divides the input size K of every matrix [N, K] in `shapes`, whose output
    sizes N the device's packing takes (CPU: multiples of 16, CUDA: of 8); ConfigError where there is none."""
    rows = 16 if device_type == "cpu" else 8
    if bad := [(n, k) for n, k in shapes if n % rows or k % 32]:
        n, k = bad[0]
        raise ConfigError(f"int4 on {device_type.upper()} needs matrices of a multiple of {rows} rows by a multiple of 32 columns, "
                          f"and this model has one of {n} x {k}")  # fmt: skip
    return next(g for g in GROUPS if all(k % g == 0 for _, k in shapes))


def quantize(w: torch.Tensor, group: int, device_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] (any float dtype; the work runs where it is) -> the packed weights in `device_type`'s layout
    and their (scale, zero) pairs [K / group, N, 2] bf16."""
    n, k = w.shape
    groups = w.float().view(n, k // group, group)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # [N, G]
    scale = ((high - low) / 15).clamp(min=1e-12).to(torch.bfloat16)
    zero = (low + 8 * scale.float()).to(torch.bfloat16)
    # quantize against the rounded scale and zero, so that what the kernel reconstructs is nearest
    q = ((groups - zero.float()[..., None]) / scale.float()[..., None] + 8).round().clamp(0, 15)
    return pack(q.to(torch.int32).view(n, k), scale, zero, device_type)


def pack(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, device_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, K] integers in 0..15, scale and zero [N, K / group] bf16 (w = (q - 8) * scale + zero) -> the packed
    weights in `device_type`'s layout and their (scale, zero) pairs [K / group, N, 2] bf16."""
    k = q.shape[1]
    scale_zero = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # [K/G, N, 2]
    if device_type == "cuda":
        nibbles = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # [N, K/2], even k in the high half
        return torch._convert_weight_to_int4pack(nibbles.to("cuda"), inner_k_tiles(k)), scale_zero
    return torch._convert_weight_to_int4pack_for_cpu(q.cpu(), 1), scale_zero


def linear(x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, group: int, layout: str) -> torch.Tensor:
    """x [M, K] @ the int4 weights' [N, K].T -> [M, N] in x's dtype, by torch's kernel for their layout
    (`layout`: the device type they were packed for)."""
    mm = torch._weight_int4pack_mm if layout == "cuda" else torch._weight_int4pack_mm_for_cpu
    y = mm(x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16), packed, group, scale_zero)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def linear_kernel(x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, group: int) -> torch.Tensor | None:
    """`linear` by moe-local's `int4_linear` (the int4 experts' kernel: AVX512-VNNI and VBMI; x as int8 in blocks
    of 32, as llama.cpp's q8_0) for bf16 x [..., K] on the CPU, N a multiple of 64; None where it does not apply.
    More than KERNEL_MAX_ROWS rows (a prefill's) run that many a call: each row's sums are its own, so the bits
    are a decode step's, and a weight read serves 16 rows (a 512 x 2048 x 12352 product, Qwen3.6-35B-A3B's input
    projection: 0.65-0.89 s against torch's `_weight_int4pack_mm_for_cpu`'s 1.5, 2 threads, busy machine)."""
    k, n = x.shape[-1], scale_zero.shape[1]
    rows = x.numel() // k if k else 0
    if x.is_cuda or x.dtype != torch.bfloat16 or rows == 0 or n % 64 or k % group:
        return None
    lib = native.library()
    if isinstance(lib, str) or not lib.experts_int4:
        return None
    x = x.contiguous()
    y = torch.empty(*x.shape[:-1], n, dtype=torch.bfloat16)
    flat_x, flat_y = x.view(rows, k), y.view(rows, n)
    for start in range(0, rows, KERNEL_MAX_ROWS):
        run = min(KERNEL_MAX_ROWS, rows - start)
        native.check(lib.int4_linear(flat_x[start].data_ptr(), run, k, packed.data_ptr(), scale_zero.data_ptr(), n, group, flat_y[start].data_ptr(),
                                     torch.get_num_threads()), "int4")  # fmt: skip
    return y


class Int4Linear(nn.Module):
    """A linear layer with int4 weights in groups of `group`, quantized from a float weight [N, K] where it lies
    (in its device's layout); the bias (if any) kept as it is."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group: int):
        super().__init__()
        packed, scale_zero = quantize(weight, group, weight.device.type)
        self.register_buffer("weight", packed)
        self.register_buffer("scale_zero", scale_zero)
        self.group, self.layout, self.bias = group, weight.device.type, bias
        self.out_features, self.in_features = weight.shape

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: int) -> Int4Linear:
        return cls(linear.weight, linear.bias, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear_kernel(x, self.weight, self.scale_zero, self.group) if self.layout == "cpu" else None
        if y is None:
            y = linear(x, self.weight, self.scale_zero, self.group, self.layout)
        return y if self.bias is None else y + self.bias

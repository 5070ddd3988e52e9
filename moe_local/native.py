"""moe-local's own CPU kernels (`cpu_kernels.c` beside this file: the decode attention and the fused
attention block of `cpu_attention.py`, the MXFP4 products of `experts/mxfp4.py`, the grouped SwiGLU experts
of `experts/formats.py` and the Gated DeltaNet decode step and chunked prefill rule of `cpu_deltanet.py`), built on first use by the machine's C compiler (`CC`, default `cc`) for the
machine's own CPU (`-march=native`; x86 with AVX2) and kept in the cache folder (`$MOE_LOCAL_CACHE/kernels`,
default ~/.cache/moe-local/kernels; `MOE_LOCAL_KERNEL_FLAGS` adds compiler flags). They are called through
ctypes, which releases the GIL; their OpenMP threads are torch's libgomp. Where they cannot be built, or
`MOE_LOCAL_KERNELS=0`, torch's kernels do the work and the load's notes say why (`unavailable`). No library
has these: torch has no decode-shaped CPU attention, and its CPU MXFP4 path widens every weight."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path

from moe_local.paths import cache_root

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")


def unavailable() -> str | None:
    """Why the kernels cannot be used, or None when they can (building them the first time)."""
    lib = library()
    return lib if isinstance(lib, str) else None


@functools.cache
def library() -> ctypes.CDLL | str:
    """The built kernels, or why there are none."""
    if os.environ.get("MOE_LOCAL_KERNELS", "1") == "0":
        return "MOE_LOCAL_KERNELS=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"moe-local's CPU kernels are for x86 CPUs, not {platform.machine()}"

    cc, flags = os.environ.get("CC") or "cc", (*FLAGS, *os.environ.get("MOE_LOCAL_KERNEL_FLAGS", "").split())
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join((cc, *flags, _cpu())).encode()).hexdigest()[:16]
    path = cache_root() / "kernels" / f"cpu-kernels-{digest}.so"
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:  # a read-only cache folder: build it for this process only
            path = Path(tempfile.mkdtemp(prefix="moe-local-")) / path.name
        built = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            result = subprocess.run([cc, *flags, str(SOURCE), "-o", str(built)], capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as e:
            return f"the C compiler ({cc}) could not run: {e}"
        if result.returncode:
            errors = [line for line in result.stderr.splitlines() if "error" in line] or result.stderr.splitlines() or ["no message"]
            return f"{cc} could not build moe-local's CPU kernels: {errors[0].strip()}"
        os.replace(built, path)  # whole or not at all, also when several processes build it at once
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return f"moe-local's CPU kernels could not be loaded: {e}"
    c_int, c_long, c_void_p = ctypes.c_int, ctypes.c_long, ctypes.c_void_p
    lib.attend.argtypes = [c_void_p, c_int, c_int, c_int, c_int, c_void_p, c_long, c_long, c_void_p, c_long, c_long, c_int, c_int,
                           ctypes.c_float, c_void_p, c_long, c_long, c_void_p, c_void_p, c_int]  # fmt: skip
    lib.attend.restype = c_int
    lib.bf16_pairs = bool(lib.attend_bf16_pairs())  # AVX512-BF16
    lib.mxfp4_linear.argtypes = [c_void_p, c_int, c_int, c_void_p, c_void_p, c_int, c_void_p, c_int]
    lib.mxfp4_linear.restype = c_int
    lib.experts_swiglu.argtypes = [c_void_p, c_int, c_int, c_int, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_int, c_int]
    lib.experts_swiglu.restype = c_int
    lib.experts_int8 = bool(lib.experts_int8())  # int8 experts too (AVX512-VNNI)
    lib.experts_swiglu_int4.argtypes = [c_void_p, c_int, c_int, c_int, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_int, c_void_p, c_int, c_int]
    lib.experts_swiglu_int4.restype = c_int
    lib.experts_int4 = bool(lib.experts_int4())  # int4 experts (AVX512-VNNI and VBMI)
    lib.experts_swiglu_int4_tc.argtypes = lib.experts_swiglu_int4.argtypes  # int4 in CUDA's layout (VNNI)
    lib.experts_swiglu_int4_tc.restype = c_int
    lib.experts_swiglu_fp8.argtypes = [c_void_p, c_int, c_int, c_int, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_int, c_int, c_void_p, c_int]
    lib.experts_swiglu_fp8.restype = c_int  # FP8 experts (AVX2 and F16C, AVX512F where the CPU has it)
    lib.int8_linear.argtypes = [c_void_p, c_int, c_int, c_void_p, c_void_p, c_int, c_void_p, c_int]
    lib.int8_linear.restype = c_int
    lib.int4_linear.argtypes = [c_void_p, c_int, c_int, c_void_p, c_void_p, c_int, c_int, c_void_p, c_int]
    lib.int4_linear.restype = c_int
    lib.bf16_linear.argtypes = [c_void_p, c_int, c_int, c_void_p, c_void_p, c_int, c_void_p, c_int]
    lib.bf16_linear.restype = c_int
    lib.experts_ggml.argtypes = [c_void_p, c_int, c_int, c_int, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_int, c_int]
    lib.experts_ggml.restype = c_int
    lib.experts_ggml_blocks = bool(lib.experts_ggml_blocks())  # a GGUF's Q8_0/Q4_0/Q4_K/Q5_K/Q6_K/... experts (AVX2, F16C)
    from moe_local.weights.ggml import lattices  # (torch's and gguf's modules: imported where the kernels are first used)

    lib.ggml_lattices.argtypes, lib.ggml_lattices.restype = [c_void_p, c_void_p, c_void_p], c_int
    lib.ggml_lattices(*(t.ctypes.data_as(c_void_p) for t in lattices()))  # IQ2_XXS's and IQ3_XXS's tables, the format's data
    lib.experts_decode.argtypes = [c_void_p, c_void_p, c_int, c_void_p, c_void_p, c_int, c_void_p, c_int]
    lib.experts_decode.restype = c_int
    lib.attention_step.argtypes = [c_void_p, c_int, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_long, c_int, c_void_p, c_void_p, c_void_p, c_int]
    lib.attention_step.restype = c_int
    lib.deltanet_step.argtypes = [c_void_p, c_int, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_int]
    lib.deltanet_step.restype = c_int
    lib.deltanet_block.argtypes = [c_void_p, c_int, c_void_p, c_void_p, c_void_p, c_void_p, c_int]
    lib.deltanet_block.restype = c_int
    lib.deltanet_chunked.argtypes = [c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_int, c_void_p, c_void_p, c_int, c_int, c_int,
                                     c_int, c_int, c_void_p, c_void_p, c_int]  # fmt: skip
    lib.deltanet_chunked.restype = c_int
    return lib


def check(code: int, kernel: str) -> None:
    """Raise on a kernel's nonzero return code: 1, sizes it cannot take (its callers check those first), 2,
    out of memory."""
    if code:
        raise RuntimeError(f"{kernel} kernel: " + ("sizes it cannot take" if code == 1 else "out of memory"))


def _cpu() -> str:
    """The CPU's model and flags, part of the built file's name: -march=native code is for this CPU only
    (a cache folder may be shared between machines)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "".join(next((line for line in lines if line.startswith(key)), "") for key in ("model name", "flags"))
    except OSError:
        return platform.processor()

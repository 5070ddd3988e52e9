"""moe-local: run Mixture-of-Experts language models on one machine whose GPU is too small for them."""

from moe_local.errors import MoeLocalError

__all__ = ["Engine", "MoeLocalError", "Options", "load"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # torch comes with the engine: imported on first use, so that `import moe_local` (and `moe-local --help`) is quick
    if name in ("Engine", "Options", "load"):
        from moe_local.threads import set_openmp_defaults

        set_openmp_defaults()  # before the engine imports torch, which loads libgomp
        from moe_local import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'moe_local' has no attribute {name!r}")

"""moe-local: run Mixture-of-Experts language models on one machine whose GPU is too small for them."""

from moe_local.engine import Engine, Options, load
from moe_local.errors import MoeLocalError

__all__ = ["Engine", "MoeLocalError", "Options", "load"]
__version__ = "0.1.0"

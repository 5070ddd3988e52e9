"""Where moe-local keeps what it writes on disk: `cache_root`, for the quantized experts (`experts/qcache.py`), the
built CPU kernels (`native.py`) and saved chats (`chat.py`). Imports nothing of moe-local, so that the lowest
modules can ask it."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$MOE_LOCAL_CACHE`, else ~/.cache/moe-local."""
    return Path(os.environ.get("MOE_LOCAL_CACHE") or Path.home() / ".cache" / "moe-local")

"""What a newcomer trips over (issue 14): fast failures before the slow load, messages for a person,
quiet pipes, context limits said out loud, the options llama.cpp and Ollama users expect."""

from __future__ import annotations

import os
from pathlib import Path


def test_the_tests_quantized_cache_lives_in_pytests_temporary_folder(tmp_path_factory):
    cache = Path(os.environ["MOE_LOCAL_CACHE"])
    assert cache.is_dir() and cache.is_relative_to(tmp_path_factory.getbasetemp())

"""Hit rate and experts copied per eviction policy, slot count and prefetch, on a real checkpoint (CPU).

    python scripts/compare_policies.py moe_local/demo

Prints the markdown table recorded in docs/measurements.md."""

from __future__ import annotations

import sys

import moe_local
from moe_local.experts.cache import POLICIES
from moe_local.generate import SamplingParams

PROMPT = "import os\nimport sys\n\ndef main(argv):\n"


def main(folder: str, new_tokens: int = 96) -> None:
    for slots in (4, 8, 12, 16):
        for policy in POLICIES:
            for prefetch in (False, True):
                engine = moe_local.load(folder, device="cpu", expert_slots=slots, policy=policy, prefetch=prefetch)
                ids = engine.tokenizer.encode(PROMPT)
                list(engine.generate(ids, new_tokens, SamplingParams(temperature=0)))
                s = engine.experts.stats.as_dict()
                on = "on" if prefetch else "off"
                print(f"| {slots} | {policy} | {on} | {100 * s['hit_rate']:.1f} % | {s['misses'] + s['prefetched']} |")
    print(f"({len(ids)} prompt tokens, {new_tokens} new)", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1])

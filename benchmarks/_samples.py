"""The benchmarks' calibration samples: random text, one byte a token for the fixtures' byte-level tokenizer."""

from __future__ import annotations

import json
import random
from pathlib import Path

ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?-"


def write_random_text(path: Path, n: int, seq_len: int) -> Path:
    """`n` samples of `seq_len` characters (seeded: the same file every time) as a JSON list at `path`."""
    rng = random.Random(0)
    path.write_text(json.dumps(["".join(rng.choice(ALPHABET) for _ in range(seq_len)) for _ in range(n)]))
    return path

"""Random ids for requests, traces, spans and answers: unique, never secret.

Not os.urandom: that is a system call per id, and a call makes five of them. Not the `random`
module's shared generator either: an application that seeds it for its own reproducibility
(`random.seed(42)`, or a test framework doing so per test) would make Keel's ids repeat. Keel
has its own generator, seeded from the OS, and reseeded in a forked child so that two workers
never share a sequence.
"""

from __future__ import annotations

import os
import random

_rng = random.Random()


def random_hex(nbytes: int) -> str:
    """`nbytes` random bytes as lower-case hex."""
    return f"{_rng.getrandbits(nbytes * 8):0{nbytes * 2}x}"


os.register_at_fork(after_in_child=_rng.seed)

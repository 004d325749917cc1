"""Random ids for requests, traces, spans and answers: unique, never secret.

Not os.urandom: that is a system call per id, and a call makes five of them. The `random`
module's shared generator is reseeded in a forked child, so two workers never share a sequence.
"""

from __future__ import annotations

import random


def random_hex(nbytes: int) -> str:
    """`nbytes` random bytes as lower-case hex."""
    return f"{random.getrandbits(nbytes * 8):0{nbytes * 2}x}"

"""The garbage collector, set for a dispatcher's process: a large state that lives long (every
open incident, the dedupe window, the registries) beside many objects that live for one
message.

Python's defaults collect the youngest generation every 700 allocations, and the whole heap
whenever it has grown by a quarter: at a wave of 5,000 incidents, a handful of messages
allocate 700 containers, and the collections took some 4 s of a 25 s replay, the full ones
100 ms each. Start-up objects are frozen out of collections altogether; the young generation
is collected every ``YOUNG`` allocations, the older ones correspondingly less often. Almost
nothing a message allocates forms a cycle (its objects go when it is done), so garbage
waits little longer for it.
"""

from __future__ import annotations

import gc

YOUNG = 50_000  # allocations between collections of the young generation
OLDER = (20, 10)  # collections of each generation between two of the next one


def settle() -> None:
    """Start-up is over: collect once, keep everything alive now out of every later
    collection (it lives as long as the process), and collect less often from here on."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG, *OLDER)

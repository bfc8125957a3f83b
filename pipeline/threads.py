"""torch's intra-op thread count, set for one block and restored after it.

`torch.set_num_threads` is process-wide: a stage that sets it and returns changes every later
PyTorch result in the same process (fp32 sums reduce in a different order), so a reference
computed after a validate or benchmark call would no longer equal one computed before it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with `count` intra-op threads (None or 0: leave the current count)."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)

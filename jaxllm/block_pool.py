"""Host-side bookkeeping of the KV cache's pages: which are free, and how many sequences hold each.

The pages themselves live on the device (see `pallas_kernels.metadata`); this pool only hands out page
numbers. A page shared by several sequences (parallel samples of one prompt) is freed when its last holder
lets go. Invariant: every page is either in `_free` (ref count 0) or held (ref count >= 1), never both.
"""

from __future__ import annotations

import collections


class OutOfPagesError(RuntimeError):
    """The pool cannot supply the pages asked for."""


class BlockPool:
    """Free list and reference counts of `num_pages` pages of `page_size` tokens each."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"need at least one page of one token, got {num_pages} pages of {page_size}")
        self.num_pages, self.page_size = num_pages, page_size
        self._free = collections.deque(range(num_pages))
        self._refs = [0] * num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of pages in use (vLLM's `kv_cache_usage`)."""
        return 1.0 - self.num_free / self.num_pages

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def allocate(self, count: int) -> list[int]:
        """`count` fresh pages, each with one holder."""
        if count > len(self._free):
            raise OutOfPagesError(f"asked for {count} pages, {len(self._free)} free")
        pages = [self._free.popleft() for _ in range(count)]
        for page in pages:
            self._refs[page] = 1
        return pages

    def share(self, pages: list[int]) -> list[int]:
        """One more holder for each of `pages` (already held)."""
        for page in pages:
            if self._refs[page] < 1:
                raise ValueError(f"page {page} is free and cannot be shared")
            self._refs[page] += 1
        return list(pages)

    def free(self, pages: list[int]) -> None:
        """Drop one holder of each page; pages nobody holds go back to the free list."""
        for page in reversed(pages):
            if self._refs[page] < 1:
                raise ValueError(f"page {page} freed twice")
            self._refs[page] -= 1
            if self._refs[page] == 0:
                self._free.append(page)

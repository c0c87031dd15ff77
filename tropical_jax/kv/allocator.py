"""Host-side KV page allocator and per-sequence block tables.

Pure Python on purpose: the real engine and the scheduler/simulator share it for page
accounting, and allocation never touches the device (the device only sees padded int32 block
tables). Ref counts let pages be shared (e.g. a common prompt prefix); a page returns to the
free list when its count reaches zero.
"""

from __future__ import annotations


class OutOfPages(RuntimeError):
    """Raised when an all-or-nothing allocation cannot be satisfied."""


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int):
        if num_pages <= 0 or page_size <= 0:
            raise ValueError(f"num_pages and page_size must be positive, got {num_pages}, {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self._refs = [0] * num_pages
        self._shared = 0  # pages held more than once (incref); while there are none, release needs no checks
        # Pop from the end: low page ids are handed out first, which keeps tests readable.
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of pages ({n})")
        if n > len(self._free):
            raise OutOfPages(f"need {n} pages, {len(self._free)} of {self.num_pages} free")
        free = self._free
        if n == 1:  # a decode step crossing a page boundary: the most frequent call by far
            p = free.pop()
            self._refs[p] = 1
            return [p]
        pages = free[len(free) - n:][::-1]  # as if popped from the end one by one
        del free[len(free) - n:]
        refs = self._refs
        for p in pages:
            refs[p] = 1
        return pages

    def incref(self, pages) -> None:
        for p in pages:
            if self._refs[p] <= 0:
                raise ValueError(f"page {p} is free; cannot share it")
        for p in pages:
            self._refs[p] += 1
            self._shared += self._refs[p] == 2

    def free(self, pages) -> None:
        pages = list(pages)
        # Validate everything first so a bad call changes nothing.
        counts: dict[int, int] = {}
        for p in pages:
            if not 0 <= p < self.num_pages:
                raise ValueError(f"page {p} out of range [0, {self.num_pages})")
            counts[p] = counts.get(p, 0) + 1
            if counts[p] > self._refs[p]:
                raise ValueError(f"double free of page {p}")
        for p in pages:
            self._refs[p] -= 1
            self._shared -= self._refs[p] == 1
            if self._refs[p] == 0:
                self._free.append(p)

    def free_own(self, pages: list[int]) -> None:
        """free() for the pages of one block table, which it got from allocate: distinct and held. Unless
        some page is shared, the one check is that none is free already (its table released twice, or
        the page freed elsewhere), one test per page as it is zeroed: free()'s full checks would triple
        the cost of a simulated run's costliest allocator call, and a page put on the free list twice
        would be handed to two sequences."""
        if self._shared:
            self.free(pages)
            return
        refs = self._refs
        for p in pages:
            if not refs[p]:  # free already, or listed twice here (zeroed at its first listing)
                self._undo_release(pages, p)
            refs[p] = 0
        self._free.extend(pages)

    def _undo_release(self, pages: list[int], bad: int) -> None:
        """free_own found page `bad` free: give back the pages it zeroed before it, then raise."""
        stop = pages.index(bad)
        if bad not in self._free:  # held until this call, so zeroed at its first listing: stopped at its second
            stop = pages.index(bad, stop + 1)
        for p in pages[:stop]:
            self._refs[p] = 1
        raise ValueError(f"double free of page {bad}")

    def ref_count(self, page: int) -> int:
        return self._refs[page]


class BlockTable:
    """The pages of one sequence, in order; token i lives in pages[i // page_size]."""

    def __init__(self):
        self.pages: list[int] = []

    def ensure(self, allocator: PageAllocator, num_tokens: int) -> bool:
        """Grow to hold num_tokens. Returns False, changing nothing, if pages run out."""
        missing = allocator.pages_for(num_tokens) - len(self.pages)
        if missing > 0:
            if not allocator.can_allocate(missing):
                return False
            self.pages.extend(allocator.allocate(missing))
        return True

    def release(self, allocator: PageAllocator) -> None:
        allocator.free_own(self.pages)
        self.pages = []

"""The per-worker shared board: a table of numbers, one row per serving process and one for the
owner, that every process of a run reads and each writes its own row of.

It lives in an anonymous memory file (`memfd_create`) that the owner of the listening socket
creates before it starts workers: no path in any file system, nothing to clean up, nothing
another user can read or plant. A forked worker inherits the map; a worker started as a fresh
interpreter gets the file's descriptor and maps it (`Board(rows, width, fd=...)`). The metrics
(`_metrics`) and systemd's session counts (`_systemd`) each keep one, with their own width.
"""

from __future__ import annotations

import mmap
import os

__all__ = ["Board"]


class Board:
    """`rows` rows of `width` float cells for serving processes, then one for the owner.

    Without `fd` a new anonymous memory file (zeroed); with `fd`, the owner's, inherited.
    """

    def __init__(self, rows: int, width: int, fd: int | None = None,
                 name: str = "pymilterkit") -> None:
        self.rows = rows
        self.width = width
        size = self.size(rows, width)
        if fd is None:
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
        self.fd = fd
        self._map = mmap.mmap(fd, size)  # MAP_SHARED: every process sees every write
        self.cells = memoryview(self._map).cast("d")
        self.owner_row = rows

    @staticmethod
    def size(rows: int, width: int) -> int:
        """Bytes of a board of `rows` rows (and the owner's) of `width` cells."""
        return (rows + 1) * width * 8

    def row(self, index: int) -> int:
        """The first cell of row `index`."""
        return index * self.width

    def total(self, offset: int, rows: range | list[int] | None = None) -> float:
        """Cell `offset` summed over the serving processes' rows (or the given `rows`)."""
        cells, width = self.cells, self.width
        return sum(cells[r * width + offset] for r in (range(self.rows) if rows is None else rows))

    def close(self) -> None:
        self.cells.release()
        self._map.close()
        os.close(self.fd)

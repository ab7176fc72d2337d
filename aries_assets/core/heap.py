"""A bucket writer's freed memory, given back to the system when it piles up or is about to.

glibc's malloc keeps what a chunk frees for later allocations. Allocations of other
sizes cannot always reuse it, so a writer's resident memory creeps up chunk by chunk:
on the messy benchmark set, 35 MB over a 16 MB bucket, while Arrow held 12 MB at
most. `malloc_trim` gives the free pages back, but returning them after every chunk
costs the next chunk's allocations a page fault each (conversion ran 10 to 25%
slower). So a write gives them back only once it has grown past the bucket's own
bytes (and past a floor under which the ratio means nothing): what a writer holds
stays near the bucket's size plus one chunk's transient copies.

Where there is no glibc (macOS, musl) or no `/proc`, nothing is trimmed.

Arrow's buffers live in jemalloc, not glibc: what it keeps freed goes back before a document
larger than a chunk is converted (`give_back_arrow_pages`, below).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import struct
from collections.abc import Callable

import numpy as np

# Below this much growth a write never trims: a small bucket's fixed costs are not a leak.
FLOOR_BYTES = 8 * 1024 * 1024


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int | None:
    """This process's resident memory (Linux), or None."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return None


class HeapWatch:
    """Watches one bucket write: `after_chunk` trims the heap once the writer has grown past the
    bucket's raw bytes since the write began."""

    def __init__(self, bucket_bytes: int) -> None:
        self.start = resident_bytes() if _TRIM is not None else None
        self.limit = max(bucket_bytes, FLOOR_BYTES)
        self.trims = self.give_backs = 0

    def after_chunk(self) -> None:
        if self.start is None:
            return
        now = resident_bytes()
        if now is not None and now - self.start > self.limit:
            _TRIM(0)
            self.trims += 1

    def before_join(self) -> None:
        """Before the bucket's runs are joined, whose footers and copies are Python's, not Arrow's:
        what Arrow's jemalloc holds freed goes back first once it is more than the bucket's bytes
        (a large document's copies, freed but kept: the 4.8 MB messy bucket peaked while joined,
        at 3.0x to 3.1x its BSON, and at 2.6x to 2.75x once they went back first)."""
        freed = arrow_freed_bytes()
        if freed is not None and freed > self.limit:
            give_back_arrow_pages()
            self.give_backs += 1


# --- Arrow's jemalloc ---------------------------------------------------------------------------
#
# jemalloc keeps what Arrow frees for a second (`dirty_decay_ms:1000`, purged by its background
# thread), for the next allocations of the same sizes. A small chunk's copies are about a megabyte
# each; a document larger than a chunk needs extents several times its size (its `_doc`, Arrow's
# Parquet page and the page's copy), which nothing a small chunk freed can hold, so they came on
# top: a 4.8 MB bucket holding one 2 MB document peaked at 3.2x to 3.8x its BSON. Arrow's
# `MemoryPool.release_unused` should hand the freed pages back, but pyarrow 25 passes jemalloc the
# name `arena.MALLCTL_ARENAS_ALL.purge`, with the macro never expanded, so it does nothing; purging
# at every free (`dirty_decay_ms:0`) made conversion a third slower. So a writer purges once,
# before such a document, through jemalloc's own `mallctl`, which pyarrow's wheels keep only in
# libarrow's symbol table. The function is found there and checked before it is ever called: its
# address follows from an exported Arrow function's (the same file's table gives both), its first
# bytes in memory must be its bytes in the file, and it must report a jemalloc 5 version. Anything
# else (another platform, a stripped library, the system allocator) and nothing is purged.

_MALLCTL = Callable[[bytes, object, object, object, int], int]
_ANCHOR = b"_ZN5arrow21jemalloc_set_decay_msEi"  # exported, and in the same symbol table
_PURGE_ALL = b"arena.4096.purge"  # MALLCTL_ARENAS_ALL is 4096 in jemalloc 5
_SYMBOL = np.dtype(
    [("name", "<u4"), ("info", "u1"), ("other", "u1"), ("section", "<u2"), ("value", "<u8"), ("size", "<u8")]
)
_SECTION = struct.Struct("<IIQQQQIIQQ")  # Elf64_Shdr: name, type, flags, addr, offset, size, link, ...
_SHT_SYMTAB, _STT_FUNC = 2, 2


def _libarrow() -> str | None:
    import pyarrow as pa

    if "jemalloc" not in pa.supported_memory_backends():
        return None
    folder = os.path.dirname(pa.__file__)
    names = [n for n in os.listdir(folder) if n.startswith("libarrow.so.") and n[12:].isdigit()]
    return os.path.join(folder, names[0]) if len(names) == 1 else None


def _functions(path: str, names: list[bytes]) -> dict[bytes, tuple[int, bytes]]:
    """Each named function's address in `path`'s symbol table and its first bytes in the file."""
    found: dict[bytes, tuple[int, bytes]] = {}
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as image:
        if image[:5] != b"\x7fELF\x02" or image[5] != 1:  # 64-bit, little-endian
            return found
        (table,) = struct.unpack_from("<Q", image, 0x28)  # e_shoff
        size, count = struct.unpack_from("<HH", image, 0x3A)  # e_shentsize, e_shnum
        sections = [_SECTION.unpack_from(image, table + i * size) for i in range(count)]
        for symtab in (sec for sec in sections if sec[1] == _SHT_SYMTAB):
            strings = sections[symtab[6]]
            symbols = np.frombuffer(image, _SYMBOL, symtab[5] // _SYMBOL.itemsize, symtab[4])
            for name in names:
                offsets, start = [], strings[4]
                while (at := image.find(name + b"\0", start, strings[4] + strings[5])) >= 0:
                    offsets.append(at - strings[4])
                    start = at + 1
                hits = symbols[np.isin(symbols["name"], offsets) & (symbols["info"] & 0xF == _STT_FUNC)]
                if len(hits) != 1 or not 0 < hits[0]["section"] < count:
                    continue
                value, code = int(hits[0]["value"]), sections[hits[0]["section"]]
                at = code[4] + value - code[3]
                found[name] = (value, bytes(image[at : at + 32]))
            del symbols
    return found


def _jemalloc_mallctl() -> _MALLCTL | None:
    try:
        path = _libarrow()
        if path is None:
            return None
        library = ctypes.CDLL(path)  # pyarrow's own, already loaded
        found = _functions(path, [_ANCHOR, b"je_arrow_mallctl"])
        if len(found) != 2:
            return None
        base = ctypes.cast(getattr(library, _ANCHOR.decode()), ctypes.c_void_p).value - found[_ANCHOR][0]
        value, first_bytes = found[b"je_arrow_mallctl"]
        if ctypes.string_at(base + value, len(first_bytes)) != first_bytes:
            return None
        mallctl = ctypes.CFUNCTYPE(
            ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t
        )(base + value)
        version, length = ctypes.c_char_p(), ctypes.c_size_t(ctypes.sizeof(ctypes.c_char_p))
        if mallctl(b"version", ctypes.byref(version), ctypes.byref(length), None, 0) != 0:
            return None
        return mallctl if (version.value or b"").startswith(b"5.") else None
    except Exception:  # noqa: BLE001 (a probe: whatever it did not expect, nothing is purged)
        return None


_JEMALLOC_MALLCTL = _jemalloc_mallctl()


def give_back_arrow_pages() -> bool:
    """Hand the pages Arrow's jemalloc holds freed back to the system now; False where it cannot."""
    return _JEMALLOC_MALLCTL is not None and _JEMALLOC_MALLCTL(_PURGE_ALL, None, None, None, 0) == 0


def arrow_freed_bytes() -> int | None:
    """What Arrow's jemalloc holds freed (its dirty and muzzy pages, all arenas), or None."""
    if _JEMALLOC_MALLCTL is None:
        return None
    epoch = ctypes.c_uint64(1)
    _JEMALLOC_MALLCTL(b"epoch", None, None, ctypes.byref(epoch), ctypes.sizeof(epoch))  # fresh stats
    # jemalloc's pages, not the system's: a wheel may be built for 64 KiB pages on a 4 KiB system.
    counts = [
        _jemalloc_size(name)
        for name in (b"stats.arenas.4096.pdirty", b"stats.arenas.4096.pmuzzy", b"arenas.page")
    ]
    if None in counts:
        return None
    dirty, muzzy, page = counts
    return (dirty + muzzy) * page


def _jemalloc_size(name: bytes) -> int | None:
    value = ctypes.c_size_t()
    length = ctypes.c_size_t(ctypes.sizeof(value))
    if _JEMALLOC_MALLCTL(name, ctypes.byref(value), ctypes.byref(length), None, 0) != 0:
        return None
    return value.value

"""Probes of what this test process holds: sockets, tasks, peer connections, memory.

The gateway (an aiohttp test server) and the aiortc viewers share one process, so every
probe counts both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import gc
import os

from aiortc import RTCPeerConnection


def open_sockets(kind: str) -> int:
    """Sockets of this process listed in /proc/net/<kind> (udp: ICE/DTLS, tcp: HTTP)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    count = 0
    for table in (f"/proc/net/{kind}", f"/proc/net/{kind}6"):
        with open(table) as fh:
            next(fh)
            count += sum(line.split()[9] in inodes for line in fh)
    return count


def open_fds() -> int:
    """File descriptors of this process, of any kind."""
    return len(os.listdir("/proc/self/fd"))


def media_tasks() -> list[str]:
    """Running tasks, minus aiohttp's per-connection handlers (HTTP keep-alive, not media)."""
    names = []
    for task in asyncio.all_tasks():
        code = task.get_coro().cr_code  # type: ignore[union-attr]
        if "aiohttp" not in code.co_filename:
            names.append(code.co_qualname)
    return sorted(names)


def webrtc_tasks() -> list[str]:
    """Running tasks of aiortc and aioice: they end some loop turns after a close returns."""
    names = []
    for task in asyncio.all_tasks():
        code = task.get_coro().cr_code  # type: ignore[union-attr]
        if any(f"/{lib}/" in code.co_filename for lib in ("aiortc", "aioice")):
            names.append(code.co_qualname)
    return sorted(names)


def peer_connections() -> int:
    """RTCPeerConnection objects alive, found among everything the collector tracks."""
    gc.collect()
    # type(), not isinstance(): that asks every object its __class__, and lazy proxies (the
    # openai client's) answer by importing ~1,500 modules, 45 MB of RSS.
    return sum(issubclass(type(o), RTCPeerConnection) for o in gc.get_objects())


def rss_bytes() -> int:
    """Resident set size of this process (VmRSS of /proc/self/status)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                value, unit = line.split()[1:3]
                assert unit == "kB", line
                return int(value) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    libc = ctypes.CDLL(None)  # the symbols the interpreter is linked with
    return libc if hasattr(libc, "malloc_trim") else None


def pin_malloc_thresholds() -> None:
    """Fix glibc's mmap and trim thresholds at their initial 128 KiB, for the whole process.

    glibc raises both each time a large mmapped block is freed (video frames, codec buffers),
    after which such blocks come from the heaps and their free space stays resident: tens of
    MB of RSS that come and go with timing, and that ``malloc_trim`` cannot return (it leaves
    the tops of the threads' heaps alone). Pinned, large blocks are mmapped and unmapped
    again, and RSS follows what is in use. Irreversible (no call re-enables the sliding
    thresholds); later tests only mmap more often.
    """
    libc = _glibc()
    if libc is not None:
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        assert libc.mallopt(m_trim_threshold, 128 * 1024) == 1
        assert libc.mallopt(m_mmap_threshold, 128 * 1024) == 1


def trimmed_rss() -> int:
    """RSS after a garbage collection and ``malloc_trim``, which hands the free pages inside
    glibc's heaps back to the kernel: what the allocator keeps for reuse is not a leak."""
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
    return rss_bytes()

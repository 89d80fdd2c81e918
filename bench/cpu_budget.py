"""A fixed CPU budget per fan-out worker process, from the kernel's CFS bandwidth control.

Does the gateway scale with cores? On a machine with as many cores as we want, the answer is
"N workers serve N times one worker's viewers". This machine has two, and the browser-like
load client needs most of one, so the question is asked with budgets instead: every worker
gets the same share of a core (``cpu.cfs_quota_us`` in its own cgroup), the owner (renderer,
encoder, signalling) and the client keep what is left, and one worker's capacity is compared
with two workers' under the same per-worker budget. What does not scale (the owner's work per
worker, a shared lock, the client) shows up as a ratio below 2.

cgroup v1 (``/sys/fs/cgroup/cpu``) or v2 (``/sys/fs/cgroup`` or its ``unified`` mount, with
the ``cpu`` controller enabled) and root are needed; the groups are removed afterwards.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

PERIOD_US = 100_000


def children(pid: int) -> list[int]:
    """The direct child processes of ``pid`` (its fan-out workers, for a gateway)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return sorted(set(found))


def _hierarchy() -> tuple[Path, bool]:
    """Where to make groups, and whether it is cgroup v2."""
    v1 = Path("/sys/fs/cgroup/cpu")
    if (v1 / "cpu.cfs_quota_us").exists():
        return v1, False
    for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        controllers = root / "cgroup.subtree_control"
        if controllers.exists() and "cpu" in controllers.read_text().split():
            return root, True
    raise RuntimeError("no cgroup cpu controller to set CPU budgets with (v1 /sys/fs/cgroup/cpu, "
                       "or v2 with +cpu in cgroup.subtree_control)")


def check_available() -> None:
    """Fail early, before any data point, if budgets cannot be set here."""
    root, _ = _hierarchy()
    if not os.access(root, os.W_OK):
        raise RuntimeError(f"cannot create CPU budget groups under {root}: run as root")


@contextlib.contextmanager
def per_process_budget(pids: list[int], share: float, tag: str) -> Iterator[list[Path]]:
    """Each of ``pids`` in a group of its own, limited to ``share`` of one core."""
    root, v2 = _hierarchy()
    groups: list[Path] = []
    try:
        for pid in pids:
            group = root / f"avatargw-bench-{tag}-{pid}"
            group.mkdir()
            groups.append(group)
            quota = max(1000, round(share * PERIOD_US))
            if v2:
                (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
            else:
                (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                (group / "cpu.cfs_quota_us").write_text(str(quota))
            (group / "cgroup.procs").write_text(str(pid))
        yield groups
    finally:
        for group in groups:
            _remove(root, group)


def throttled_s(group: Path) -> float:
    """Seconds the group's tasks were held back by the budget so far."""
    stat = dict(line.split() for line in (group / "cpu.stat").read_text().splitlines())
    if "throttled_usec" in stat:
        return int(stat["throttled_usec"]) / 1e6
    return int(stat.get("throttled_time", 0)) / 1e9


def _remove(root: Path, group: Path) -> None:
    """Hand any process still inside back to the root group, then remove the group."""
    with contextlib.suppress(OSError):
        for pid in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                (root / "cgroup.procs").write_text(pid)
    with contextlib.suppress(OSError):
        group.rmdir()

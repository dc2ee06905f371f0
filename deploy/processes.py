"""Track the processes of a local FLARE system by id, and stop exactly those (Linux ``/proc``).

FLARE's start scripts detach: ``start.sh`` backgrounds ``sub_start.sh`` (a restart loop that writes its own id to
``daemon_pid.fl``), which runs the server or client (id in ``pid.fl``), which spawns one process per job. A
:class:`ProcessTracker` records such ids together with each process's start time, so a recycled id is never
mistaken for ours, adds their descendants on :meth:`ProcessTracker.refresh`, and :meth:`ProcessTracker.stop`
signals only the recorded processes.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Dict, Iterable, List, Optional, Tuple

PID_FILES = ("daemon_pid.fl", "pid.fl")


def _stat(pid: int) -> Optional[Tuple[str, int, int]]:
    """(state, parent id, start time in clock ticks) of a process, or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    rest = raw[raw.rfind(")") + 2:].split()
    return rest[0], int(rest[1]), int(rest[19])


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _children() -> Dict[int, List[int]]:
    kids: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st:
                kids.setdefault(st[1], []).append(int(entry))
    return kids


def read_pid_files(participant_dirs: Iterable[str]) -> List[int]:
    """Ids in the ``daemon_pid.fl`` / ``pid.fl`` files of FLARE participant folders."""
    pids = []
    for d in participant_dirs:
        for name in PID_FILES:
            try:
                with open(os.path.join(d, name)) as f:
                    pids.append(int(f.read().strip()))
            except (OSError, ValueError):
                pass
    return pids


class ProcessTracker:
    """A set of processes, identified by (id, start time)."""

    def __init__(self) -> None:
        self.procs: Dict[int, int] = {}  # pid -> start time
        self.labels: Dict[int, str] = {}

    def add(self, pid: int, label: str = "") -> bool:
        st = _stat(pid)
        if st is None or st[0] == "Z":
            return False
        if pid not in self.procs:
            self.procs[pid] = st[2]
            self.labels[pid] = label or cmdline(pid)[:160]
        return True

    def add_pid_files(self, participant_dirs: Iterable[str]) -> None:
        for pid in read_pid_files(participant_dirs):
            self.add(pid)

    def refresh(self) -> None:
        """Add every live descendant of the tracked processes (job processes appear while jobs run)."""
        kids = _children()
        todo = [p for p in self.procs if self._is_ours(p)]
        while todo:
            pid = todo.pop()
            for child in kids.get(pid, []):
                if child not in self.procs and self.add(child):
                    todo.append(child)

    def _is_ours(self, pid: int) -> bool:
        st = _stat(pid)
        return st is not None and st[0] != "Z" and st[2] == self.procs.get(pid)

    def alive(self) -> List[int]:
        """Tracked processes still running, in the order they were added (restart loops before their children)."""
        return [p for p in self.procs if self._is_ours(p)]

    def wait_gone(self, timeout: float, poll: float = 0.5) -> List[int]:
        deadline = time.monotonic() + timeout
        while True:
            self.refresh()
            left = self.alive()
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(poll)

    def signal_all(self, sig: int) -> List[int]:
        hit = []
        for pid in self.alive():
            try:
                os.kill(pid, sig)
                hit.append(pid)
            except ProcessLookupError:
                pass
        return hit

    def stop(self, grace: float = 30.0) -> Dict[str, List[int]]:
        """Wait up to ``grace`` seconds for the tracked processes to exit, then SIGTERM, then SIGKILL the rest.
        Returns the ids that needed each signal (empty lists: everything exited by itself)."""
        result = {"terminated": [], "killed": []}
        if not self.wait_gone(grace):
            return result
        result["terminated"] = self.signal_all(signal.SIGTERM)
        if self.wait_gone(10.0):
            result["killed"] = self.signal_all(signal.SIGKILL)
            self.wait_gone(5.0)
        return result

    def describe(self) -> List[str]:
        return [f"{pid}: {self.labels.get(pid, '')}" for pid in sorted(self.procs)]

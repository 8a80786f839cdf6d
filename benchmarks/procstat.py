"""CPU time of the processes a benchmark depends on, read from Linux ``/proc``.

Rates on a shared 2-core box swing ±30 % with whatever else runs; CPU seconds per
transition do not, so the benchmark reports what one transition costs the workers,
PostgreSQL and RabbitMQ. A server is found by the TCP port it listens on, so another
cluster on the same box (other engineers' tests) is not counted; when that fails (a
server in a container, or not on this machine) every process with the server's command
name is counted instead, and ``ServerCpu.scope`` says so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["ServerCpu", "Stat", "cpu_seconds", "listener_pid", "read_stat"]

_TICK = os.sysconf("SC_CLK_TCK")
_LISTEN = "0A"  # TCP state in /proc/net/tcp
_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0", ""}


@dataclass(frozen=True)
class Stat:
    """The fields of ``/proc/<pid>/stat`` we need, times in seconds."""

    pid: int
    comm: str
    ppid: int
    own_s: float  # utime + stime
    reaped_s: float  # cutime + cstime: children that exited and were waited for

    @classmethod
    def parse(cls, pid: int, text: str) -> Stat:
        # comm may hold spaces and parentheses: it is everything up to the last ")".
        head, tail = text.rsplit(")", 1)
        fields = tail.split()  # fields[0] is field 3 (state)
        utime, stime, cutime, cstime = (int(value) for value in fields[11:15])
        return cls(
            pid=pid,
            comm=head.split("(", 1)[1],
            ppid=int(fields[1]),
            own_s=(utime + stime) / _TICK,
            reaped_s=(cutime + cstime) / _TICK,
        )


def read_stat(pid: int) -> Stat | None:
    """One process's counters, or None once it has gone (or off Linux)."""
    try:
        return Stat.parse(pid, Path(f"/proc/{pid}/stat").read_text())
    except (OSError, ValueError, IndexError):
        return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 once it has gone, or off Linux)."""
    stat = read_stat(pid)
    return stat.own_s if stat is not None else 0.0


def _all_stats() -> list[Stat]:
    stats: list[Stat] = []
    try:
        entries = list(Path("/proc").iterdir())
    except OSError:  # not Linux
        return stats
    for entry in entries:
        if entry.name.isdigit():
            stat = read_stat(int(entry.name))
            if stat is not None:
                stats.append(stat)
    return stats


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == _LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def _fd_links(pid: int) -> set[str]:
    """What a process's open descriptors point at (empty when not ours to read)."""
    links: set[str] = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return links
    for fd in fds:
        try:
            links.add(os.readlink(fd))
        except OSError:  # closed meanwhile
            continue
    return links


def listener_pid(port: int, comm: str) -> int | None:
    """The process named ``comm`` that holds the socket listening on ``port``, if readable.

    Reading other users' ``/proc/<pid>/fd`` needs root or the same user; without it this
    answers None and the caller falls back to every process named ``comm``.
    """
    targets = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    if not targets:
        return None
    stats = _all_stats()
    comm_of = {stat.pid: stat.comm for stat in stats}
    holders = []
    for stat in stats:
        if stat.comm != comm:
            continue
        if _fd_links(stat.pid) & targets:
            holders.append(stat)
    # A forked child may have inherited the socket: the root is the one whose parent differs.
    holders.sort(key=lambda stat: comm_of.get(stat.ppid) == comm)
    return holders[0].pid if holders else None


def url_port(url: str, default: int) -> int | None:
    """The port of a server URL when it names this machine (else its CPU is not ours to read)."""
    parts = urlsplit(url)
    if (parts.hostname or "") not in _LOCAL_HOSTS:
        return None
    return parts.port or default


class ServerCpu:
    """CPU seconds of one server: its root process, its live children and its reaped ones.

    For PostgreSQL the root is the postmaster and its children are the backends and
    auxiliary processes; a backend that exits mid-window moves from the live sum to the
    postmaster's cutime/cstime, so a delta of ``seconds()`` counts it exactly once. For
    RabbitMQ the root is ``beam.smp``.
    """

    def __init__(self, comm: str, url: str, default_port: int) -> None:
        self.comm = comm
        port = url_port(url, default_port)
        self.root = listener_pid(port, comm) if port is not None else None
        if self.root is not None:
            self.scope = f"{comm} pid {self.root} and its children"
        elif port is None:
            self.scope = f"n/a: {comm} is not on this machine"
        else:
            self.scope = f"every {comm} process on this box (listener on :{port} not found)"
        self.local = port is not None

    def seconds(self) -> float | None:
        """CPU used so far; None when the server is not on this machine."""
        if not self.local:
            return None
        stats = _all_stats()
        if self.root is not None:
            return sum(
                stat.own_s + (stat.reaped_s if stat.pid == self.root else 0.0)
                for stat in stats
                if stat.pid == self.root or stat.ppid == self.root
            )
        named = {stat.pid for stat in stats if stat.comm == self.comm}
        # Each family's top process also holds what its exited children used.
        return sum(
            stat.own_s + (stat.reaped_s if stat.ppid not in named else 0.0)
            for stat in stats
            if stat.pid in named
        )

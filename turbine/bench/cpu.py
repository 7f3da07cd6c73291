"""CPU time of server processes over a benchmark run, read from /proc (Linux only).

`/proc/<pid>/stat` fields 14 and 15 (utime, stime) already sum every thread of the process, so
a Rust or Python server with many threads is measured whole. A name given as ``name=pid+`` also
adds the process's live descendants (e.g. workers forked by a one-process `serve`), found via
`/proc/<pid>/task/<tid>/children`. Descendants that exit during the run are not counted.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` (all its threads) in seconds; None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm (field 2) may contain spaces and parentheses: split after the *last* ')'
    fields = raw.rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _HZ


def descendants(pid: int) -> list[int]:
    """Live descendant process ids of ``pid`` (children of every thread, recursively)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


@dataclass(frozen=True)
class Target:
    """One measured process: a display name, a pid, and whether its descendants count too."""

    name: str
    pid: int
    tree: bool = False


def parse_pids(spec: str) -> list[Target]:
    """Parse ``"frontend=123,worker=456+"`` (``+``: include descendants) into targets."""
    out: list[Target] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, sep, pid = item.partition("=")
        tree = pid.endswith("+")
        pid = pid.rstrip("+")
        if not sep or not name or not pid.isdigit():
            raise ValueError(f"bad --pids entry {item!r}: expected NAME=PID or NAME=PID+")
        out.append(Target(name, int(pid), tree))
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate names in --pids {spec!r}")
    return out


def _cpu(target: Target) -> dict[int, float]:
    pids = [target.pid] + (descendants(target.pid) if target.tree else [])
    out = {}
    for p in pids:
        s = process_cpu_seconds(p)
        if s is not None:
            out[p] = s
    return out


@dataclass
class CpuMeter:
    """Snapshot CPU time at `start()`, then `stop()` returns seconds used per target name.

    Per-pid snapshots mean a descendant born mid-run counts from zero and one that dies is
    dropped, rather than making the total jump. A target whose main pid is gone at either end
    gets None.
    """

    targets: list[Target]
    _start: dict[str, dict[int, float]] = field(default_factory=dict)

    def start(self) -> None:
        self._start = {t.name: _cpu(t) for t in self.targets}

    def stop(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for t in self.targets:
            before, after = self._start.get(t.name, {}), _cpu(t)
            if t.pid not in before or t.pid not in after:
                out[t.name] = None
                continue
            out[t.name] = sum(s - before.get(p, 0.0) for p, s in after.items())
        return out

"""The fleet's shared secret for the request plane (``Hello`` frame, see tcp.py).

Where it comes from, first match wins: ``--cluster-token``, ``$TURBINE_CLUSTER_TOKEN``, or, for a
fleet on one machine, a file in the shared discovery directory that the first process creates
(mode 0600 in a 0700 directory). The file makes the default safe: every process of the user who
runs the fleet reads the same token, and other users of the machine cannot open streams on its
workers.
"""
from __future__ import annotations

import contextlib
import logging
import os
import secrets
from pathlib import Path

log = logging.getLogger("turbine.runtime")

ENV = "TURBINE_CLUSTER_TOKEN"
FILE_NAME = ".cluster-token"


def fleet_token(discovery_dir: str | os.PathLike[str] | None = None, given: str | None = None) -> str | None:
    """The token to present and require; None only without a flag, env var or directory."""
    if given:
        return given
    env = os.environ.get(ENV)
    if env:
        return env
    if discovery_dir is None:
        return None
    return _token_file(Path(discovery_dir))


def _token_file(directory: Path) -> str:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / FILE_NAME
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    tmp = directory / f".{FILE_NAME}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
        with contextlib.suppress(FileExistsError):  # another process won the race: use theirs
            os.link(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return _read(path)


def _read(path: Path) -> str:
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"the cluster token file {path} is empty")
    if path.stat().st_mode & 0o077:
        log.warning("the cluster token file %s is readable by other users (chmod 600 it)", path)
    return token

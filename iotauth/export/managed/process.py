"""The Mosquitto process the follower signals (SIGHUP) and, when its state is lost, restarts.

Mosquitto writes its pid to ``pid_file`` (in the export's ``state/``
directory) after it has dropped to its own account, so the file is writable
by that account: before signalling anything, the follower checks that the
process really is a Mosquitto started with *this* export's configuration
(``/proc/<pid>/cmdline``), so a tampered pid file cannot make a root follower
hang up some other process.

Restarting needs whatever supervises Mosquitto: ``--restart-command`` (for
example ``systemctl restart mosquitto``) is run without a shell. Without it,
a follower that finds Mosquitto without iotauth's state rebuilds the state
file and says, loudly, that Mosquitto must be restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
from collections.abc import Sequence
from pathlib import Path

from iotauth.errors import MosquittoUnavailable

log = logging.getLogger("iotauth.mosquitto")
CONFIG_FLAGS = ("-c", "--config-file")


def started_with(pid: int, config: Path) -> bool:
    """Whether process ``pid`` is a Mosquitto whose ``-c`` argument is ``config``."""
    proc = Path("/proc") / str(pid)
    try:
        argv = (proc / "cmdline").read_bytes().split(b"\0")
        cwd = (proc / "cwd").resolve()
    except OSError:
        return False
    words = [a.decode(errors="replace") for a in argv if a]
    if not words or "mosquitto" not in Path(words[0]).name:
        return False
    for flag, value in itertools.pairwise(words):
        if flag in CONFIG_FLAGS:
            given = Path(value)
            return (given if given.is_absolute() else cwd / given).resolve() == config.resolve()
    return False


class MosquittoProcess:
    """Find, reload and restart the Mosquitto that runs an export's ``mosquitto.conf``."""

    def __init__(self, config: Path, pid_file: Path, restart_command: Sequence[str] | None = None) -> None:
        self.config = config
        self.pid_file = pid_file
        self.restart_command = list(restart_command) if restart_command else None

    def pid(self) -> int | None:
        """The verified pid of the running Mosquitto, or None (not running, or the pid file lies)."""
        try:
            text = self.pid_file.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None
        if not text.isdigit() or int(text) <= 1:
            return None
        pid = int(text)
        if not started_with(pid, self.config):
            log.warning("%s names process %d, which is not a Mosquitto running %s: not signalling it",
                        self.pid_file, pid, self.config)
            return None
        return pid

    def reload(self) -> int:
        """SIGHUP Mosquitto (it re-reads its CRL and certificates); returns the pid signalled."""
        pid = self.pid()
        if pid is None:
            raise MosquittoUnavailable(f"no running Mosquitto with {self.config} (pid file {self.pid_file})")
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            raise MosquittoUnavailable(f"Mosquitto (pid {pid}) is gone") from None
        except PermissionError:
            raise MosquittoUnavailable(f"not allowed to signal Mosquitto (pid {pid}): run the follower as "
                                       "root or as Mosquitto's user") from None
        return pid

    async def restart(self, timeout: float = 60.0) -> bool:  # noqa: ASYNC109 - the command gets a bounded time
        """Run the restart command; False when there is none or it failed."""
        if self.restart_command is None:
            return False
        log.warning("restarting Mosquitto: %s", " ".join(self.restart_command))
        try:
            process = await asyncio.create_subprocess_exec(
                *self.restart_command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE)
        except OSError as exc:
            log.error("cannot run the restart command: %s", exc)
            return False
        try:
            _, errors = await asyncio.wait_for(process.communicate(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            log.error("the restart command did not finish within %.0f s", timeout)
            return False
        if process.returncode != 0:
            log.error("the restart command failed (exit %s): %s", process.returncode,
                      errors.decode(errors="replace").strip()[:300])
            return False
        return True

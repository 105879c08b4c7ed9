"""The device's state directory: its identity files, the rotation journal, and atomic replacement.

Every write is atomic (temporary file, fsync, rename, fsync of the
directory), so a power cut leaves each file either old or new, never torn.
The journal (``rotation.json``) says how far a renewal got; see
:mod:`firmware_tools.agent` for its states.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from iotauth.files import fsync_dir, write_public
from iotauth.rotation import messages

JOURNAL = "rotation.json"
LIVE = ("key.pem", "cert.pem", "chain.pem", "fullchain.pem")
EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_STATE = 1, 2, 3
CRASH_POINTS = ("keyed", "requested", "published", "issued", "confirmed", "confirm-sent", "activated", "switched",
                "promoting", "promoted")
"""Where ``--crash-at`` kills the agent with SIGKILL (a power cut at that step), for the crash tests."""


class AgentError(Exception):
    """The renewal did not complete; ``code`` is the protocol's refusal code or the agent's own reason."""

    def __init__(self, code: str, message: str, exit_code: int = EXIT_REFUSED, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.code, self.exit_code, self.retry_after = code, exit_code, retry_after


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` so that a crash leaves either the old or the new content: temp, fsync, rename, fsync dir."""
    write_public(path, data, mode)


def _remove(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    if paths:
        fsync_dir(paths[0].parent)


def load_key(path: Path) -> PrivateKeyTypes:
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def new_key_like(key: PrivateKeyTypes) -> PrivateKeyTypes:
    """A fresh key of the same type as the current one (the profile allowed that type)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return ec.generate_private_key(key.curve)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return ed25519.Ed25519PrivateKey.generate()
    if isinstance(key, rsa.RSAPrivateKey):
        return rsa.generate_private_key(public_exponent=65537, key_size=max(2048, key.key_size))
    raise AgentError("bad-state", f"unsupported key type {type(key).__name__}", EXIT_STATE)


def key_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass(frozen=True)
class Identity:
    """One key and certificate chain, as files paho can load."""

    name: str
    key: Path
    fullchain: Path

    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.fullchain.read_bytes())


class StateDir:
    """The device's state directory and its rotation journal."""

    def __init__(self, root: Path, crash_at: str | None = None) -> None:
        self.root = root
        self.crash_at = crash_at
        try:
            self.config = json.loads((root / "config.json").read_text())
            self.device_id = str(self.config["device_id"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AgentError("not-provisioned", f"{root} holds no provisioned config.json ({exc})", EXIT_STATE) from exc
        for name in ("key.pem", "fullchain.pem", "ca.pem"):
            if not (root / name).exists():
                raise AgentError("not-provisioned", f"{root / name} is missing; provision the device first", EXIT_STATE)
        self.live = Identity("current", root / "key.pem", root / "fullchain.pem")
        self.next = Identity("new", root / "next-key.pem", root / "next-fullchain.pem")

    def path(self, name: str) -> Path:
        return self.root / name

    def crash(self, point: str) -> None:
        """Die here, as a power cut would, if ``--crash-at`` names this point (the crash tests)."""
        if point == self.crash_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def journal(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path(JOURNAL).read_text())
        except FileNotFoundError:
            return {}
        except ValueError:  # only a write that never completed could leave this; the rename makes that impossible
            return {}
        return data if isinstance(data, dict) else {}

    def record(self, **state: Any) -> dict[str, Any]:
        journal = {**self.journal(), **state}
        write_atomic(self.path(JOURNAL), json.dumps(journal, sort_keys=True).encode(), 0o600)
        return journal

    def reset(self) -> None:
        """Forget an unfinished rotation (the live identity is untouched)."""
        _remove(*(self.path(f"next-{n}") for n in LIVE), self.path(JOURNAL))

    def promote(self) -> None:
        """Make the new files the live ones (idempotent: a crash in the middle is finished by the next call)."""
        self.record(state="switched")
        self.crash("switched")
        new_fp = messages.certificate_sha256(self.next.cert()) if self.next.fullchain.exists() else None
        live_fp = messages.certificate_sha256(self.live.cert())
        for name in LIVE:
            keep = self.path(f"previous-{name}")
            if live_fp != new_fp and not keep.exists() and self.path(name).exists():
                write_atomic(keep, self.path(name).read_bytes(), 0o600)
        for name in LIVE:
            source = self.path(f"next-{name}")
            if source.exists():
                write_atomic(self.path(name), source.read_bytes(), 0o600 if name == "key.pem" else 0o644)
                self.crash("promoting")  # the live key replaced, the live certificate not yet
        self.crash("promoted")
        _remove(*(self.path(f"next-{n}") for n in LIVE), *(self.path(f"previous-{n}") for n in LIVE))
        _remove(self.path(JOURNAL))

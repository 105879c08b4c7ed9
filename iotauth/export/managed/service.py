"""Assemble and run the follower of one managed export (what ``iotauth mosquitto follow DIR`` calls)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from iotauth.authority import Authority
from iotauth.config import Home
from iotauth.export.access import group_of, mosquitto_account
from iotauth.export.managed.crl import Canaries, CrlPublisher
from iotauth.export.managed.follower import FollowerOptions, MosquittoFollower
from iotauth.export.managed.layout import (
    ManagedFiles,
    ManagedSettings,
    check_managed_access,
    lock_follower,
    read_admin_password,
)
from iotauth.export.managed.process import MosquittoProcess
from iotauth.policy import PolicySet


def build_follower(
    home: Home,
    authority: Authority,
    directory: Path,
    *,
    restart_command: Sequence[str] | None = None,
    options: FollowerOptions | None = None,
    on_ready: Callable[[dict[str, Any]], None] = lambda _status: None,
) -> MosquittoFollower:
    """A follower for the managed export in ``directory`` (raises a clear error if anything is missing).

    It signs CRLs, so the CA key must be usable (``IOTAUTH_CA_PASSPHRASE``);
    ``authority.ca`` raises the reason otherwise.
    """
    files = ManagedFiles.under(directory)
    settings = ManagedSettings.read(files)
    password = read_admin_password(home, settings)
    authority.ca  # noqa: B018 - fail now, with the reason, if this Authority cannot sign
    account = mosquitto_account(settings.user)
    check_managed_access(files, account)
    lock_follower(files)  # held until this process exits
    process = MosquittoProcess(files.config, files.pid, restart_command)
    crl = CrlPublisher(authority, files, process, (settings.probe_host, settings.device_port), group_of(account),
                       Canaries(home.chain_file))
    policies = PolicySet.from_profiles(authority.settings.profiles.values())
    return MosquittoFollower(home=home, authority=authority, policies=policies, files=files, settings=settings,
                             password=password, process=process, crl=crl, options=options or FollowerOptions(),
                             on_ready=on_ready)

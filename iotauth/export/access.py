"""Can Mosquitto's own account read what an export wrote? Checked at export time, not at its first start.

Mosquitto started as root reads its configuration file as root and then drops
to its account (``user``, default ``mosquitto``) *before* it opens anything
else: CA, certificate, key, CRL, ACL file, the dynamic-security state (and on
every SIGHUP, the configuration again). A parent directory of mode 0700 or a
key owned by root therefore fails later, at start-up ("Error opening acl
file", "Unable to load CA certificates") or, worse, at a reload. The export
checks every path, and every directory on the way to it, with the account's
uid and groups, and fails with the first thing that would stop Mosquitto.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from iotauth.errors import ConfigError

DEFAULT_ACCOUNT = "mosquitto"


@dataclass(frozen=True)
class Account:
    """A system account as the kernel checks it: uid and every group id."""

    name: str
    uid: int
    gid: int
    groups: frozenset[int]


def mosquitto_account(user: str | None) -> Account | None:
    """The account Mosquitto will run as, or None when nothing needs checking.

    Only root switches accounts: run by anyone else, Mosquitto keeps the
    caller's identity (the one that wrote the files). As root without ``user``,
    Mosquitto drops to ``mosquitto`` when that account exists.
    """
    if os.geteuid() != 0:
        return None
    name = user or DEFAULT_ACCOUNT
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        if user is not None:
            raise ConfigError(f"no such user {user!r} for Mosquitto to run as") from None
        return None
    if entry.pw_uid == 0:
        return None
    return Account(name, entry.pw_uid, entry.pw_gid, frozenset(os.getgrouplist(name, entry.pw_gid)))


def group_of(account: Account | None) -> int | None:
    """The group files are handed to so ``account`` can read them (None: leave ownership alone)."""
    return account.gid if account is not None else None


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _allowed(account: Account, info: os.stat_result, want: int) -> bool:
    """Whether ``account`` has every permission in ``want`` (a mask of R_OK/W_OK/X_OK) on ``info``."""
    if info.st_uid == account.uid:
        shift = 6
    elif info.st_gid in account.groups:
        shift = 3
    else:
        shift = 0
    return (info.st_mode >> shift) & want == want


def _describe(path: Path, info: os.stat_result) -> str:
    try:
        owner = pwd.getpwuid(info.st_uid).pw_name
    except KeyError:
        owner = str(info.st_uid)
    return f"{path} (mode {stat.S_IMODE(info.st_mode):04o}, owner {owner}:{group_name(info.st_gid)})"


def check_access(account: Account | None, read: Iterable[Path], write: Iterable[Path] = ()) -> None:
    """Raise a :class:`ConfigError` naming the first path ``account`` could not read (or write).

    Every directory from ``/`` down to each file must let the account in
    (search permission); each file in ``read`` must be readable, each in
    ``write`` readable and writable (a directory in ``write``: enterable and
    writable).
    """
    if account is None:
        return
    wanted = [(Path(p).absolute(), os.R_OK) for p in read] + [(Path(p).absolute(), os.R_OK | os.W_OK) for p in write]
    for path, want in wanted:
        for directory in reversed(path.parents):
            info = directory.stat()
            if not _allowed(account, info, os.X_OK):
                raise ConfigError(
                    f"Mosquitto runs as {account.name!r} and could not reach {path}: directory "
                    f"{_describe(directory, info)} does not let it in. Export to a directory it can reach, "
                    f"grant it search permission (chmod o+x), or name the account it runs as with --user"
                )
        info = path.stat()
        need = want | (os.X_OK if stat.S_ISDIR(info.st_mode) else 0)
        if not _allowed(account, info, need):
            verb = "write" if want & os.W_OK else "read"
            raise ConfigError(
                f"Mosquitto runs as {account.name!r} and could not {verb} {_describe(path, info)}; "
                f"fix its ownership or mode, or name the account it runs as with --user"
            )

"""The cluster's CURVE keys: who may join the broker's backend (and, optionally, its frontend).

The key model: one keypair for the broker and one for the workers, per cluster, in one keys
directory (owner-only: the directory 0700, every file 0600)::

    <keys>/broker.key            the broker's public key (workers and CURVE clients need it)
    <keys>/broker.key_secret     the broker's secret key (the broker only)
    <keys>/worker.key            the workers' public key
    <keys>/worker.key_secret     the workers' secret key (every worker)
    <keys>/authorized/*.key      the public keys the broker lets join its backend

The broker's backend is a CURVE server: a worker proves it holds the secret of a key listed in
``authorized/`` (ZeroMQ's ZAP, run by pyzmq's ``zmq.auth`` ThreadAuthenticator), and it checks
the broker's public key in turn. A process that cannot read the directory cannot join, so it
cannot get a shard, read a shard's keys, forge replies, or take over a worker's route.

The first start of a cluster creates the directory (:func:`ensure_keys`): the broker and the
workers all call it, and it is race-free (keys made in a private temporary directory, renamed
into place in one step; a loser of the race uses the winner's). ``python -m zkv keygen DIR``
writes the same set for other hosts: copy it (or, for a worker host, ``broker.key``,
``worker.key`` and ``worker.key_secret``) with its permissions.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

log = logging.getLogger(__name__)

BROKER = "broker"
WORKER = "worker"
AUTHORIZED = "authorized"
DIR_MODE = 0o700
FILE_MODE = 0o600


class KeysError(Exception):
    """The keys directory cannot be used (incomplete, unreadable): a message for a person."""


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A CURVE keypair as ZeroMQ takes it (Z85 bytes); ``secret`` None for a public key."""

    public: bytes
    secret: bytes | None


@dataclass(frozen=True, slots=True)
class Keys:
    """A cluster's keys directory."""

    directory: Path

    @property
    def authorized(self) -> Path:
        return self.directory / AUTHORIZED

    def broker(self, secret: bool = False) -> KeyPair:
        """The broker's keypair (``secret``: with its secret key)."""
        return self._load(BROKER, secret)

    def worker(self) -> KeyPair:
        """The workers' keypair, secret included."""
        return self._load(WORKER, True)

    def _load(self, name: str, secret: bool) -> KeyPair:
        path = self.directory / (f"{name}.key_secret" if secret else f"{name}.key")
        try:
            public, secret_key = zmq.auth.load_certificate(path)
        except (OSError, ValueError) as exc:
            raise KeysError(f"cannot load {path}: {exc}") from None
        if secret and secret_key is None:
            raise KeysError(f"{path} holds no secret key")
        return KeyPair(public, secret_key)


def complete(directory: Path) -> bool:
    """Whether ``directory`` holds a whole key set."""
    names = (f"{BROKER}.key", f"{BROKER}.key_secret", f"{WORKER}.key", f"{WORKER}.key_secret")
    return all((directory / n).is_file() for n in names) and (directory / AUTHORIZED).is_dir()


def create_keys(directory: Path) -> None:
    """Write a new key set into ``directory``, which must not exist (or be empty).

    Raises:
        FileExistsError: ``directory`` already holds something.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        os.chmod(scratch, DIR_MODE)
        zmq.auth.create_certificates(scratch, BROKER)
        zmq.auth.create_certificates(scratch, WORKER)
        (scratch / AUTHORIZED).mkdir(mode=DIR_MODE)
        shutil.copyfile(scratch / f"{WORKER}.key", scratch / AUTHORIZED / f"{WORKER}.key")
        for path in scratch.rglob("*"):
            os.chmod(path, DIR_MODE if path.is_dir() else FILE_MODE)
        try:
            os.rename(scratch, directory)  # one step: others see no key set, or a whole one
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise FileExistsError(f"{directory} already exists") from None
            raise
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)


def ensure_keys(directory: Path | str) -> Keys:
    """The key set in ``directory``, created first if it does not exist (a cluster's first
    start). Every service calls this; concurrent calls agree on one key set.

    Raises:
        KeysError: ``directory`` exists but does not hold a whole key set.
    """
    directory = Path(directory).absolute()
    if not complete(directory):
        try:
            create_keys(directory)
        except FileExistsError:
            if not complete(directory):
                raise KeysError(
                    f"{directory} exists but is not a whole key set (broker.key, "
                    f"broker.key_secret, worker.key, worker.key_secret, {AUTHORIZED}/): "
                    f"remove it to create new keys, or copy the cluster's keys there"
                ) from None
        else:
            log.info("created the cluster's keys in %s (owner-only)", directory)
    if directory.stat().st_mode & 0o077:
        log.warning("%s is readable by other users: anyone who can read it can join", directory)
    return Keys(directory)

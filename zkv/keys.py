"""The cluster's CURVE keys: who may join the broker's backend (and, optionally, its frontend).

The key model: one keypair for the broker and one for the workers, per cluster, in one keys
directory (owner-only: the directory 0700, every file 0600)::

    <keys>/broker.key            the broker's public key (workers and CURVE clients need it)
    <keys>/broker.key_secret     the broker's secret key (the broker only)
    <keys>/worker.key            the workers' public key
    <keys>/worker.key_secret     the workers' secret key (every worker)
    <keys>/authorized/*.key      the public keys the broker lets join its backend
    <keys>/client.key            a clients' public key (optional frontend CURVE)
    <keys>/client.key_secret     its secret key (every client that uses CURVE)
    <keys>/clients/*.key         the public keys the broker lets use its frontend (--frontend-curve)

With ``--frontend-curve`` (``ZKV_FRONTEND_CURVE=1``) the frontend is a CURVE server too, under
the ZAP domain ``clients`` with its own authorised set, ``clients/``: a client key never lets
anyone join the backend as a worker, and a worker key never opens the frontend. Clients load
``broker.key``, ``client.key`` and ``client.key_secret`` (:func:`client_curve`). A key set made
before client keys existed gets them at the broker's first start with ``--frontend-curve``
(:func:`ensure_client_keys`).

The broker's backend is a CURVE server: a worker proves it holds the secret of a key listed in
``authorized/`` (ZeroMQ's ZAP, run by pyzmq's ``zmq.auth`` ThreadAuthenticator), and it checks
the broker's public key in turn. A process that cannot read the directory cannot join, so it
cannot get a shard, read a shard's keys, forge replies, or take over a worker's route.

The first start of a cluster creates the directory (:func:`ensure_keys`): the broker calls
it, and it is race-free (keys made in a private temporary directory, renamed into place in one
step; a loser of the race uses the winner's). Workers never create keys: they wait up to
``WORKER_KEYS_WAIT_S`` for the broker's (:func:`wait_for_keys`), since a key set a worker made
could only be one the broker does not know (a worker pointed at another directory, or on
another host) and its handshake would fail; under honcho the broker, started with them,
creates the set within milliseconds. ``python -m zkv keygen DIR``
writes the same set for other hosts: copy it (or, for a worker host, ``broker.key``,
``worker.key`` and ``worker.key_secret``) with its permissions.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from zkv.config import boolean, env_default, keys_default

log = logging.getLogger(__name__)

BROKER = "broker"
WORKER = "worker"
AUTHORIZED = "authorized"
CLIENT = "client"
CLIENTS = "clients"
CLIENTS_DOMAIN = "clients"  # the ZAP domain of the frontend, whose keys are in clients/
DIR_MODE = 0o700
FILE_MODE = 0o600
# How long a worker waits for the broker to create the cluster's keys at a first start, and
# how often it looks; then it exits with a message (status 2).
WORKER_KEYS_WAIT_S = 10.0
KEYS_POLL_S = 0.05


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

    @property
    def clients(self) -> Path:
        return self.directory / CLIENTS

    def client(self) -> KeyPair:
        """The clients' keypair, secret included."""
        return self._load(CLIENT, True)

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


# What a worker host needs (the README's list): the broker's public key to check it, and the
# workers' keypair to prove itself. Not the broker's secret, nor authorized/: an operator copies
# only these three files to a worker host, and a worker that waited for the rest never started.
WORKER_FILES = (f"{BROKER}.key", f"{WORKER}.key", f"{WORKER}.key_secret")
# What a client host needs for the frontend's CURVE (client_curve reads these three).
CLIENT_FILES = (f"{BROKER}.key", f"{CLIENT}.key", f"{CLIENT}.key_secret")


def worker_complete(directory: Path) -> bool:
    """Whether ``directory`` holds what a worker needs (:data:`WORKER_FILES`)."""
    return all((directory / name).is_file() for name in WORKER_FILES)


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
        zmq.auth.create_certificates(scratch, CLIENT)
        (scratch / CLIENTS).mkdir(mode=DIR_MODE)
        shutil.copyfile(scratch / f"{CLIENT}.key", scratch / CLIENTS / f"{CLIENT}.key")
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


def wait_for_keys(
    directory: Path | str,
    timeout_s: float = WORKER_KEYS_WAIT_S,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Keys:
    """The worker's keys in ``directory`` (:data:`WORKER_FILES`), waiting up to ``timeout_s``
    for the broker to create them (a whole set appears in one rename, so a subset never shows).

    Raises:
        KeysError: no whole key set appeared in time; the message says where to find one.
    """
    directory = Path(directory).absolute()
    deadline_s = clock() + timeout_s
    logged = False
    while not worker_complete(directory):
        if clock() >= deadline_s:
            raise KeysError(
                f"no cluster keys in {directory} after {timeout_s:.0f} s. Workers do not create "
                f"keys: the broker does at its first start, in its --keys/ZKV_KEYS (default "
                f"<ZKV_DATA_DIR>/keys). Start the broker first, or give this worker the "
                f"broker's keys: the same ZKV_DATA_DIR or ZKV_KEYS as the broker; on another "
                f"host copy {', '.join(WORKER_FILES)} from the cluster's keys (cp -p; made once "
                f"with zkv keygen DIR, docs/cluster.md). A broker run with --insecure needs "
                f"workers with --insecure"
            )
        if not logged:
            log.info("waiting up to %.0f s for the broker's keys in %s", timeout_s, directory)
            logged = True
        sleep(KEYS_POLL_S)
    if directory.stat().st_mode & 0o077:
        log.warning("%s is readable by other users: anyone who can read it can join", directory)
    return Keys(directory)


def ensure_client_keys(keys: Keys) -> Keys:
    """``keys`` with a clients' keypair and ``clients/``, added if the set predates them (the
    broker calls this at start with ``--frontend-curve``). Made in a private temporary
    directory; ``clients/`` is renamed into place first, so a racer that loses keeps nothing.
    """
    directory = keys.directory
    if keys.clients.is_dir() and (directory / f"{CLIENT}.key_secret").is_file():
        return keys
    scratch = Path(tempfile.mkdtemp(prefix=".clients-", dir=directory))
    try:
        zmq.auth.create_certificates(scratch, CLIENT)
        (scratch / CLIENTS).mkdir(mode=DIR_MODE)
        shutil.copyfile(scratch / f"{CLIENT}.key", scratch / CLIENTS / f"{CLIENT}.key")
        for path in scratch.rglob("*"):
            os.chmod(path, DIR_MODE if path.is_dir() else FILE_MODE)
        try:
            os.rename(scratch / CLIENTS, keys.clients)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                return keys  # made by another process meanwhile
            raise
        for name in (f"{CLIENT}.key", f"{CLIENT}.key_secret"):
            os.rename(scratch / name, directory / name)
        log.info("created the clients' keys in %s (owner-only)", directory)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return keys


@dataclass(frozen=True, slots=True)
class ClientCurve:
    """What a client socket needs for CURVE: its keypair and the broker's public key."""

    public: bytes
    secret: bytes
    server_key: bytes

    def apply(self, socket: zmq.Socket) -> None:
        """Make ``socket`` a CURVE client of the broker (before it connects)."""
        socket.curve_secretkey = self.secret
        socket.curve_publickey = self.public
        socket.curve_serverkey = self.server_key


def client_curve(directory: Path | str) -> ClientCurve:
    """The CURVE keys a client reads from a keys directory: ``client.key``,
    ``client.key_secret`` and ``broker.key`` (a client host needs only those three).

    Raises:
        KeysError: one of them is missing or unreadable.
    """
    keys = Keys(Path(directory))
    pair = keys.client()
    assert pair.secret is not None  # _load checked it
    return ClientCurve(pair.public, pair.secret, keys.broker().public)


def frontend_curve(keys: Path | str | None = None) -> ClientCurve | None:
    """A client's CURVE keys for the frontend: from ``keys`` if given; else, if
    ``$ZKV_FRONTEND_CURVE`` is on, from ``$ZKV_KEYS`` (default ``<ZKV_DATA_DIR>/keys``); else
    None, a plain connection (the default: the frontend is plain unless the broker was started
    with ``--frontend-curve``).

    Raises:
        KeysError: the keys cannot be loaded.
    """
    if keys is None:
        if not env_default("ZKV_FRONTEND_CURVE", False, boolean):
            return None
        keys = keys_default()
    return client_curve(keys)

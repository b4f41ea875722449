"""CURVE keys for endpoints that leave the machine (which ones do:
:func:`pipeline.transport.addresses.is_loopback`).

Any endpoint reachable from another host is encrypted and authenticated with ZeroMQ's CURVE
mechanism (elliptic-curve encryption, RFC 26 "CurveZMQ"): the feeder holds a secret key and
admits only the workers whose public keys sit in its authorized-keys folder; a worker holds
its own secret key and the feeder's public key, so it talks to no impostor either. Keys are
the ZPL text files of ``zmq.auth`` (``NAME.key``: public; ``NAME.key_secret``: both, mode 0600).

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> public, secret = create_keypair(folder, "feeder")
    >>> public.name, secret.name, oct(secret.stat().st_mode & 0o777)
    ('feeder.key', 'feeder.key_secret', '0o600')

References:
    zguide, chapter 5 "Securing the connection"; https://rfc.zeromq.org/spec/26/
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

log = logging.getLogger(__name__)

#: ZAP domain of the feeder's remote endpoint.
ZAP_DOMAIN = "beamline-inn"


class CurveKeyError(ValueError):
    """A key file that is missing, unreadable or of the wrong kind."""


def create_keypair(directory: Path, name: str) -> tuple[Path, Path]:
    """Write a new CURVE key pair ``DIRECTORY/NAME.key`` (public) and ``NAME.key_secret``
    (secret, readable by its owner only); refuse to overwrite an existing pair."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise FileExistsError(f"key file already exists: {path}")
    old_umask = os.umask(0o077)  # the secret file is never readable by others, not even briefly
    try:
        zmq.auth.create_certificates(str(directory), name)
    finally:
        os.umask(old_umask)
    public.chmod(0o644)
    return public, secret


def read_public_key(path: Path) -> bytes:
    """The public key (Z85, 40 bytes) in a ``.key`` or ``.key_secret`` file."""
    public, _ = _load(path)
    return public


def read_secret_key(path: Path) -> tuple[bytes, bytes]:
    """The (public, secret) keys in a ``.key_secret`` file."""
    public, secret = _load(path)
    if secret is None:
        raise CurveKeyError(f"{path} holds no secret key (pass the .key_secret file)")
    return public, secret


def _load(path: Path) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as error:
        raise CurveKeyError(f"cannot read a CURVE key from {path}: {error}") from error


def serve_curve(socket: zmq.Socket, secret_key_file: Path) -> None:
    """Make the next ``bind`` of ``socket`` a CURVE server with this key (options set on a
    ZeroMQ socket apply to the binds that follow them, so earlier endpoints stay as they are)."""
    public, secret = read_secret_key(secret_key_file)
    socket.setsockopt(zmq.CURVE_SERVER, 1)
    socket.setsockopt(zmq.CURVE_PUBLICKEY, public)
    socket.setsockopt(zmq.CURVE_SECRETKEY, secret)
    socket.setsockopt_string(zmq.ZAP_DOMAIN, ZAP_DOMAIN)


class CurveAuthenticator(ThreadAuthenticator):
    """pyzmq's ZAP authenticator (a thread) that admits the public keys of one folder and logs
    each key it refuses, with the address it came from: "refused a worker's key from
    10.0.0.7 (CURVE: not in --authorized-keys keys/authorized)". :meth:`take_refusal` tells
    the socket's owner that the disconnection that follows is that refusal.

    Args:
        context: the context whose CURVE endpoints it guards.
        authorized_keys: the folder of the admitted public keys (``*.key``).
    """

    def __init__(self, context: zmq.Context, authorized_keys: Path) -> None:
        super().__init__(context)
        self.authorized_keys = Path(authorized_keys)
        self.refused = 0
        self._unclaimed = 0
        self._lock = threading.Lock()

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        """Answer one ZAP request (pyzmq's rules), after logging a CURVE key not admitted."""
        if len(msg) == 7 and msg[5] == b"CURVE" and len(msg[6]) == 32:
            domain = msg[2].decode(self.encoding, "replace") or "*"
            key = z85.encode(msg[6])
            if not self.certs.get(domain, {}).get(key):
                with self._lock:
                    self.refused += 1
                    self._unclaimed += 1
                log.warning(
                    "refused a worker's key from %s (CURVE: not in --authorized-keys %s; its "
                    "public key is %s)",
                    msg[3].decode(self.encoding, "replace"),
                    self.authorized_keys,
                    key.decode("ascii"),
                )
        await super().handle_zap_message(msg)

    def take_refusal(self) -> bool:
        """Whether a refusal is not yet matched with the disconnection it causes (and match
        it): a peer that disconnects just after its key was refused."""
        with self._lock:
            if self._unclaimed == 0:
                return False
            self._unclaimed -= 1
            return True


def start_authenticator(context: zmq.Context, authorized_keys: Path) -> CurveAuthenticator:
    """Admit, on the CURVE endpoints of ``context``, only the public keys (``*.key`` files) in
    the folder ``authorized_keys``, logging each key refused; return the running
    authenticator (``stop()`` it)."""
    folder = Path(authorized_keys)
    if not folder.is_dir():
        raise CurveKeyError(f"authorized keys folder not found: {folder}")
    if not any(folder.glob("*.key")):
        raise CurveKeyError(f"no public key (*.key) in {folder}: no worker could connect")
    authenticator = CurveAuthenticator(context, folder)
    authenticator.start()
    authenticator.configure_curve(domain=ZAP_DOMAIN, location=str(folder))
    return authenticator


def connect_curve(socket: zmq.Socket, secret_key_file: Path, server_key_file: Path) -> None:
    """Make the next ``connect`` of ``socket`` a CURVE client with its own key pair, talking
    only to the server whose public key is in ``server_key_file``."""
    public, secret = read_secret_key(secret_key_file)
    socket.setsockopt(zmq.CURVE_PUBLICKEY, public)
    socket.setsockopt(zmq.CURVE_SECRETKEY, secret)
    socket.setsockopt(zmq.CURVE_SERVERKEY, read_public_key(server_key_file))

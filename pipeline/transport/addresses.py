"""Where a ZeroMQ endpoint reaches: a pure function of its URL (no socket, no zmq import), so
the configuration can check its endpoints without importing ZeroMQ.

Example:
    >>> is_loopback("tcp://127.0.0.1:5555"), is_loopback("tcp://*:5555")
    (True, False)
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit


def is_loopback(url: str) -> bool:
    """Whether ``url`` stays on this machine: ``ipc://``, ``inproc://``, or ``tcp://`` on a
    loopback address (127.0.0.0/8, ::1, ``localhost``). ``*``, ``0.0.0.0``, host names and
    interface names are not."""
    parts = urlsplit(url)
    if parts.scheme in ("ipc", "inproc"):
        return True
    if parts.scheme != "tcp":
        return False
    host = parts.netloc.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

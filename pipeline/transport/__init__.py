"""Moving line-outs and results between processes over ZeroMQ.

- :mod:`pipeline.transport.wire`: the message format (msgpack header + raw array frames).
- :mod:`pipeline.transport.messages`: the message kinds, one typed class each.
- :mod:`pipeline.transport.endpoints`: where the sockets of a run live.
"""

from pipeline.transport.endpoints import Endpoints
from pipeline.transport.wire import Message, ProtocolError, decode, encode

__all__ = ["Endpoints", "Message", "ProtocolError", "decode", "encode"]

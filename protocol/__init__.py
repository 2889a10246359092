"""testfleet's wire: typed messages, the JSON-RPC envelope and codecs, and a WebSocket peer."""

from protocol.codec import Codec
from protocol.errors import ErrorCode, ProtocolError

PROTOCOL_VERSION = 1

__all__ = ["PROTOCOL_VERSION", "Codec", "ErrorCode", "ProtocolError"]

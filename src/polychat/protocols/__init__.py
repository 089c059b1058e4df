"""Wire formats, free of I/O: request builders, stream decoders and encoders.

The providers decode with these modules and ``polychat serve`` encodes with them, so both sides of every protocol
share one implementation. The formats themselves are described in ``docs/protocols.md``.
"""

from polychat.protocols.base import StreamDecoder, StreamResult

__all__ = ["StreamDecoder", "StreamResult"]

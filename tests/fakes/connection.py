"""What the fake servers share about their connections: a real TCP reset."""

from __future__ import annotations

import socket
import struct

from aiohttp import web


def reset_connection(request: web.Request) -> None:
    """Abort the connection so the client sees a TCP reset (SO_LINGER 0), not a clean close."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()

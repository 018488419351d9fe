"""A run's secret on its ZMQ sockets: PLAIN credentials checked by a ZAP handler.

Every socket a run listens on (the tokenizer's requests and results sockets, a ``zmq``
transport's publisher) asks each peer for the run's token in the handshake; a peer without
it is refused before any message. The token reaches a run's processes through the spawn
pipe, or, on another host, through the join ([`mmsched.hosts`][]).
"""

from __future__ import annotations

from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

CREDENTIALS_USER = b"mmsched"
"""The PLAIN user name of a run's peers; the password is the run's token."""


def present_credentials(socket: zmq.Socket[Any], token: str) -> None:
    """Make ``socket`` log in to a socket that asks for the run's ``token``."""
    socket.plain_username = CREDENTIALS_USER
    socket.plain_password = token.encode()


def check_credentials(context: zmq.Context[Any], token: str) -> ThreadAuthenticator:
    """Start the ZAP handler of ``context`` that admits peers presenting ``token``; a socket
    then asks for it once its ``plain_server`` is set. Stop the handler before terminating
    the context (it holds a socket of it)."""
    authenticator = ThreadAuthenticator(zmq.Context.shadow(context.underlying))
    authenticator.start()
    authenticator.configure_plain(domain="*", passwords={CREDENTIALS_USER.decode(): token})
    return authenticator

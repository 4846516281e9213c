"""One message in, one reply queued: the step both transports' readers share.

Whatever a client sends, and whatever goes wrong while it is answered (a reply that cannot
be encoded, a bug), costs at most that message: it is logged and answered with -32603,
and the connection, the other clients and the daemon go on.
"""

from __future__ import annotations

import logging

from statusd.api import Api
from statusd.errors import InternalError
from statusd.protocol import jsonrpc
from statusd.session import Session

log = logging.getLogger(__name__)


async def answer(api: Api, session: Session, raw: bytes | str) -> None:
    """Answer one framed message into ``session``'s replies (nothing for notifications)."""
    try:
        line = await api.handle_message(session, raw)
        if line is None:
            return
    except Exception:
        log.exception("internal error answering a message from %s", session.caller.username)
        # Which request failed is not known here: the id may be the very value at fault.
        line = jsonrpc.encode_line(jsonrpc.error_response(None, InternalError("internal error")))
    session.add_reply(line)

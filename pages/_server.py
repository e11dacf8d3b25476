"""What the app sets up once per server process, so that a class of browsers costs little and the
server log stays readable: every page drawn through app.py, the startup heap frozen, and a browser
that vanishes logged as one line instead of a traceback.

Not a page (app.py lists the pages). Importing it (``pages._ui`` does) applies the first;
``app.py`` calls ``setup_once()`` for the others.
"""
from __future__ import annotations

import gc
import logging
import os
import sys

import streamlit as st
from streamlit.runtime.pages_manager import PagesManager
from streamlit.runtime.scriptrunner import RerunData, get_script_run_ctx

# Exceptions that only say the browser went away (a tab closed, a laptop lid shut, a network drop).
CLIENT_GONE = ("WebSocketDisconnect", "WebSocketDisconnected", "ClientDisconnected", "ConnectionClosed",
               "ConnectionClosedError", "ConnectionClosedOK")
# Where the web server logs them with a traceback: uvicorn's handler of a websocket that raised,
# and streamlit's websocket sender.
DISCONNECT_LOGGERS = ("uvicorn.error", "streamlit.web.server.starlette.starlette_websocket")


def _through_app_py() -> None:
    """Every page runs inside app.py (its sidebar, job queue and presentation style). Because pages/
    sits next to app.py, a fresh server treats the app as a "pages directory" app until app.py's
    st.navigation first runs, and the first request for a page URL (a student's link to
    /playground) would run that page alone. The first import of this module (in that first run)
    switches that mode off for the process and, when app.py is not what is running, asks for a
    rerun, which app.py then draws. The request is queued, not raised: raising inside an import
    would break the same import running in other sessions."""
    if not PagesManager.uses_pages_directory:
        return
    PagesManager.uses_pages_directory = False
    ctx = get_script_run_ctx(suppress_warning=True)
    if ctx is None or ctx.script_requests is None:
        return
    main = os.path.realpath(ctx.main_script_path)
    frame = sys._getframe()
    while frame is not None:
        if os.path.realpath(frame.f_code.co_filename) == main:
            return  # app.py is importing us: its st.navigation comes next
        frame = frame.f_back
    ctx.script_requests.request_rerun(RerunData(query_string=ctx.query_string, page_script_hash=ctx.page_script_hash,
                                                context_info=ctx.context_info))


_through_app_py()


def client_gone(exc: BaseException | None) -> bool:
    """Is ``exc`` (or what caused it, or one of a group) only a browser that went away?"""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__name__ in CLIENT_GONE:
            return True
        if isinstance(exc, BaseExceptionGroup):
            return all(client_gone(e) for e in exc.exceptions)
        exc = exc.__cause__ or exc.__context__
    return False


class ClientGoneFilter(logging.Filter):
    """A disconnect logged with a traceback becomes one INFO line: closing a tab is not an error,
    and a traceback in the log is what the browser test (rightly) fails on."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if client_gone(exc):
            record.msg, record.args = f"a browser disconnected abruptly ({type(exc).__name__}); its session ended", ()
            record.exc_info, record.exc_text, record.stack_info = None, None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


@st.cache_resource(show_spinner=False)
def setup_once() -> bool:
    """Once per app process: the disconnect filter on the web server's loggers, then the startup
    heap frozen (``gc.freeze``: torch, transformers and pandas are millions of objects, and the
    collector's automatic full passes during reruns then walk only what the app allocated since)."""
    for name in DISCONNECT_LOGGERS:
        logging.getLogger(name).addFilter(ClientGoneFilter())
    gc.collect()
    gc.freeze()
    return True

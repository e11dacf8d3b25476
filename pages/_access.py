"""Who may start and cancel jobs from this browser session: viewer mode for a class.

Class mode is on when a teacher token is set: ``LOWBIT_TEACHER_TOKEN`` (``make run CLASS=1``
makes one and prints the teacher's link) or the Streamlit secret ``teacher_token``. Then

- the browser that opened the app with ``?teacher=<token>`` is the teacher's: it starts and
  cancels any job (the token is checked once, kept in the session and taken out of the address
  bar, so it does not show on a projector);
- every other session is a viewer: it explores every stored result and the Playground; each job
  button is disabled with a one-line reason, and ``submit`` / ``cancel`` refuse on the server, so
  a forged click does nothing;
- with ``LOWBIT_VIEWER_JOBS=ceiling`` viewers may start jobs within the class ceiling
  (``launch.ceiling``), one queued or running job each, and cancel only their own.

Without a token (one user on a laptop, the default) every session may do everything.
Not a page (app.py lists the pages); pages use it through ``pages._ui``.
"""
from __future__ import annotations

import hmac
import os
import secrets

import streamlit as st

from launch.ceiling import ceiling_problems, class_spec

TOKEN_ENV, VIEWER_JOBS_ENV, QUERY_KEY = "LOWBIT_TEACHER_TOKEN", "LOWBIT_VIEWER_JOBS", "teacher"
VIEWER_JOBS = ("none", "ceiling")
_TEACHER, _SESSION_ID, _BAD_LINK = "_access_teacher", "_access_session", "_access_bad_link"
VIEWER_REASON = "Viewer mode: only the teacher's browser starts and cancels jobs; everything stored can be explored."


class Refused(PermissionError):
    """A job action this session may not take (the message says why, in one line)."""


def teacher_token() -> str | None:
    """The class's teacher token (environment first, then the Streamlit secret), or None."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        return token
    try:
        token = str(st.secrets.get("teacher_token", "")).strip()
    except Exception:  # noqa: BLE001 - no secrets file (the usual case) means no token
        token = ""
    return token or None


def viewer_jobs() -> str:
    """``LOWBIT_VIEWER_JOBS``: 'none' (default) or 'ceiling'; another value is refused by the
    sidebar (``setting_problem``) and read as 'none'."""
    value = os.environ.get(VIEWER_JOBS_ENV, "none").strip() or "none"
    return value if value in VIEWER_JOBS else "none"


def setting_problem() -> str | None:
    value = os.environ.get(VIEWER_JOBS_ENV, "none").strip() or "none"
    if value not in VIEWER_JOBS:
        return f"{VIEWER_JOBS_ENV}={value!r} is not a setting; allowed: {', '.join(VIEWER_JOBS)} (read as 'none')"
    return None


def session_id() -> str:
    """A random id for this browser session: the owner of the jobs it starts."""
    if _SESSION_ID not in st.session_state:
        st.session_state[_SESSION_ID] = secrets.token_hex(8)
    return st.session_state[_SESSION_ID]


def check_teacher_link() -> None:
    """Called by app.py on every rerun: a ``?teacher=`` in the address makes this session the
    teacher's when it matches the token; the parameter is removed either way."""
    given = st.query_params.get(QUERY_KEY)
    if given is None:
        return
    token = teacher_token()
    if token and hmac.compare_digest(given.encode(), token.encode()):
        st.session_state[_TEACHER] = True
        st.session_state.pop(_BAD_LINK, None)
    else:
        st.session_state[_BAD_LINK] = True
    del st.query_params[QUERY_KEY]


def role() -> str:
    """'owner' (no class mode), 'teacher' or 'viewer'."""
    if teacher_token() is None:
        return "owner"
    return "teacher" if st.session_state.get(_TEACHER) else "viewer"


@st.cache_resource(show_spinner=False)
def _owners() -> dict[str, str]:
    """run id -> the session that started it (this app process; the index does not keep owners)."""
    return {}


def record_owner(run_id: str) -> None:
    _owners()[run_id] = session_id()


def start_refusal(active_ids: list[str]) -> str | None:
    """Why this session may not start a job now (one line), or None. ``active_ids``: the runs
    queued or running."""
    if role() != "viewer":
        return None
    if viewer_jobs() == "none":
        return VIEWER_REASON
    mine = [r for r in active_ids if _owners().get(r) == session_id()]
    if mine:
        return f"Class mode: you have a job queued or running ({mine[0]}); one at a time per viewer."
    return None


def viewer_spec(spec: dict) -> tuple[dict, list[tuple[str, str]]]:
    """(the spec this session submits, its problems with the class ceiling): a viewer's job gets the
    class time limit when it names none and is checked against the ceiling; others pass as given."""
    if role() != "viewer":
        return spec, []
    spec = class_spec(spec)
    return spec, ceiling_problems(spec)


def cancel_refusal(run_id: str) -> str | None:
    """Why this session may not cancel ``run_id`` (one line), or None."""
    if role() != "viewer":
        return None
    if viewer_jobs() == "ceiling" and _owners().get(run_id) == session_id():
        return None
    if viewer_jobs() == "none":
        return VIEWER_REASON
    return f"Class mode: {run_id} was started by someone else; you can cancel only your own job."


def sidebar_note() -> None:
    """One line in the sidebar saying which mode this browser is in (class mode only)."""
    problem = setting_problem()
    if problem:
        st.error(problem)
    if st.session_state.get(_BAD_LINK):
        st.warning("That teacher link's token does not match: this browser is a viewer.")
    mode = role()
    if mode == "teacher":
        st.caption("Class mode: **teacher** (this browser starts and cancels jobs).")
    elif mode == "viewer":
        st.caption("Class mode: **viewer** " + ("(explore everything; jobs are started by the teacher)."
                                                if viewer_jobs() == "none" else
                                                "(jobs within the class ceiling, one at a time)."))

"""What the teaching pages (Playground, Two-shot, Where it pays, Lesson) share: the presentation
mode (large fonts, no sidebar, for a projector), the one-line "what you see" caption under every
plot, the stored-sample picker and the one-click capture job.

Not a page (app.py lists the pages); pages import it as ``from pages import _teach``.
"""
from __future__ import annotations

import os
from pathlib import Path

import plotly.graph_objects as go
import streamlit as st

from launch.presets import CAPTURE, capture_spec
from launch.store.calibration import spikiest_stored_sample
from launch.store.problems import StoreProblem
from pages import _ui

PRESENT_KEY = "presentation"
PRESENT_FONT = 26
CAPTURE_STATE = "capture_run"


def presenting() -> bool:
    return bool(st.session_state.get(PRESENT_KEY, False))


def apply_presentation() -> None:
    """Called by app.py on every rerun: in presentation mode, larger text and no sidebar."""
    if not presenting():
        return
    st.markdown(
        """<style>
        section[data-testid="stSidebar"], [data-testid="stSidebarCollapsedControl"],
        [data-testid="collapsedControl"] {display: none !important;}
        [data-testid="stMain"] p, [data-testid="stMain"] li, [data-testid="stMain"] label,
        [data-testid="stMarkdownContainer"] p {font-size: 1.45rem !important; line-height: 1.45;}
        [data-testid="stCaptionContainer"] p {font-size: 1.3rem !important;}
        [data-testid="stMetricValue"], [data-testid="stMetricValue"] [data-testid="stMarkdownContainer"] p,
        [data-testid="stMetricValue"] div {font-size: 2.8rem !important; line-height: 1.2;}
        h1 {font-size: 3.2rem !important;} h2, h3 {font-size: 2.3rem !important;}
        </style>""", unsafe_allow_html=True)


def presentation_toggle(key: str) -> None:
    """The projector switch (shared by every teaching page through session state)."""
    value = st.toggle("Presentation mode", value=presenting(), key=f"present_{key}",
                      help="Large fonts and plots, sidebar hidden: readable on a projector")
    if value != presenting():
        st.session_state[PRESENT_KEY] = value
        st.rerun()


def style(fig: go.Figure, height: int = 460, title_chars: int = _ui.TITLE_CHARS) -> go.Figure:
    """The app's plot style, larger in presentation mode."""
    fig = _ui.style(fig, height=int(height * (1.25 if presenting() else 1.0)), title_chars=title_chars)
    if presenting():
        fig.update_layout(font=dict(size=PRESENT_FONT), title_font=dict(size=PRESENT_FONT + 4),
                          legend=dict(font=dict(size=PRESENT_FONT - 4)))
        fig.update_xaxes(title_font=dict(size=PRESENT_FONT), tickfont=dict(size=PRESENT_FONT - 4))
        fig.update_yaxes(title_font=dict(size=PRESENT_FONT), tickfont=dict(size=PRESENT_FONT - 4))
        # the sidebar is hidden, so a column is wider, but the letters are larger still
        fig.layout.title.text = fig.layout.title.text and fig.layout.title.text.replace("<br>", " ")
        _ui.place_title(fig, int(title_chars * (_ui.FONT + 4) / (PRESENT_FONT + 4) * 1.3), PRESENT_FONT + 4)
    return fig


def plot(fig: go.Figure, key: str, what: str, height: int = 460) -> None:
    """A styled plot and its one-line "what you see" caption."""
    _ui.plot(style(fig, height), key=key)
    st.caption(f"**What you see:** {what}")


def show(fig: go.Figure, key: str, what: str) -> None:
    """An already styled plot (e.g. from a cache) and its "what you see" caption."""
    _ui.plot(fig, key=key)
    st.caption(f"**What you see:** {what}")


def capture_button(key: str) -> None:
    """One click: a small calibrate job that stores sample partials; its progress below."""
    st.markdown("These pages work on **real partial sums** that a calibration run stores (the first 16 tokens of "
                "every layer's o_proj and down_proj partial on every rank). None is stored yet.")
    if _ui.job_button(f"Capture samples now ({CAPTURE['model']}, TP {CAPTURE['tp']}, {CAPTURE['calib_tokens']} "
                      "tokens)", key=f"{key}_capture", refusal=_ui.start_refusal(), type="primary",
                      icon=":material/play_arrow:"):
        _ui.submit(capture_spec(), state_key=CAPTURE_STATE)
    run_id = st.session_state.get(CAPTURE_STATE)
    if run_id:
        status = _ui.show_progress(run_id)
        if status in ("queued", "running"):
            st.caption("A short job with the model cache warm (the first load of the model also converts it); "
                       "the page fills in when it is done.")
            st.button("Refresh", key=f"{key}_refresh", icon=":material/refresh:")
    st.caption("From a terminal: `.venv/bin/python -m lowbit calibrate --tp 3 --tokens 128 --seq-len 64`.")


def pick_sample(key: str):
    """A select box over the stored calibrations with samples; (folder, calibration, the spikiest
    (layer, module, rank)) or None after showing the empty state with the capture button."""
    sources = _ui.calibration_sources()
    if sources.empty:
        _ui.empty_state("No stored partial sums yet.", "Capture a few with one click below (a short job), "
                        "or run the classroom demo, which calibrates too.")
        capture_button(key)
        return None
    labels = dict(zip(sources["folder"], sources["label"]))
    folder = st.selectbox("Stored partials (a calibration)", list(labels), format_func=labels.get,
                          key=f"{key}_cal")
    try:
        cal = _ui.calibration(folder)
        spiky = spikiest(folder, calibration_stamp(folder))  # raises the no-sample error for old artifacts
    except StoreProblem as problem:  # missing, older or unreadable artifact: said, the page goes on
        st.warning(f"This calibration cannot be shown: {problem}")
        capture_button(key)
        return None
    return folder, cal, spiky


def calibration_stamp(folder: str) -> float:
    """The artifact's modification time: cache key of everything computed from it."""
    try:
        return os.stat(Path(folder) / "calibration.safetensors").st_mtime
    except OSError:
        return -1.0


@st.cache_data(show_spinner=False, max_entries=16)
def spikiest(folder: str, stamp: float) -> tuple[int, str, int]:
    """(layer, module, rank) of the stored partial with the largest max/RMS, cached per artifact."""
    return spikiest_stored_sample(_ui.calibration(folder))

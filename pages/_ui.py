"""What every page shares: the app's job queue, cached reads of the results store, submitting a
spec with its problems shown verbatim, progress of a run, and the projector-friendly plot style.

Pages import it as ``from pages._ui import ...``; it is not a page itself (app.py lists the pages).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

import launch.store.bits
import launch.store.machine
from launch.layout import runs_root
from launch.queue import JobQueue, cancel
from launch.spec import JobSpec, SpecError
from launch.store.calibration import load_calibration
from launch.store.evaluate import evaluate_runs
from launch.store.runs import load_result, run_paths, run_progress, runs_frame
from lowbit.model.models import describe_sources, known_names

FONT = 18
# Okabe-Ito: distinguishable with colour-blindness and on a washed-out projector.
COLORS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"]
# one colour per bit part, in the accounting's order (payload, outliers, scales, indices)
PART_COLORS = dict(zip(launch.store.bits.SCHEME_PARTS, ("#0072B2", "#D55E00", "#009E73", "#CC79A7"), strict=True))
POLL_S = 1.0


def root() -> str:
    """The runs root this rerun reads (``$LOWBIT_RUNS`` or ./runs), as a cache key."""
    return str(runs_root())


def cancel_run(run_id: str) -> str:
    """Cancel a queued or running run (its whole process group); returns its status after."""
    return cancel(run_id, Path(root()))


def filter_all(label: str, options, key: str, help: str | None = None) -> list:
    """A multiselect where nothing picked means everything (so rows added later stay visible)."""
    picked = st.multiselect(label, list(options), default=[], key=key, placeholder="all", help=help)
    return list(options) if not picked else picked


@st.cache_resource(show_spinner=False)
def job_queue(root_dir: str) -> JobQueue:
    """One scheduler per app process and runs root; it re-attaches runs still going after a
    restart (``JobQueue.recover``)."""
    return JobQueue(Path(root_dir), poll_s=0.5).start()


def ensure_queue() -> JobQueue:
    return job_queue(root())


# -- cached reads --------------------------------------------------------------------------------
def runs() -> pd.DataFrame:
    """Every run; read on each rerun (cheap: the index plus small files), never cached stale."""
    return runs_frame(root())


@st.cache_data(show_spinner=False, max_entries=64)
def _result_cached(root_dir: str, run_id: str, stamp: float) -> tuple[dict | None, str | None]:
    return load_result(run_id, root_dir)


def result(run_id: str) -> tuple[dict | None, str | None]:
    """result.json of a run, cached until the file changes."""
    path = run_paths(run_id, root()).result
    try:
        stamp = path.stat().st_mtime
    except OSError:
        stamp = -1.0
    return _result_cached(root(), run_id, stamp)


@st.cache_data(show_spinner=False)
def model_shape(name: str) -> dict:
    return launch.store.machine.model_shape(name)


@st.cache_data(show_spinner=False)
def valid_tp_sizes(name: str) -> list[int]:
    return launch.store.machine.valid_tp_sizes(name)


def pick_model_tp(key: str, model_col, tp_col, model: str = "smollm2-135m", tp: int = 3) -> tuple[str, int]:
    """A model select box in ``model_col`` and a TP select box (sizes the model allows) in ``tp_col``."""
    names = model_names()
    with model_col:
        chosen = st.selectbox("Model", names, index=names.index(model) if model in names else 0, key=f"{key}_model")
    sizes = valid_tp_sizes(chosen)
    with tp_col:
        size = st.selectbox("TP size", sizes, index=sizes.index(tp) if tp in sizes else 0, key=f"{key}_tp")
    return chosen, int(size)


@st.cache_data(show_spinner=False, max_entries=256)
def bits_parts(scheme: str, hidden: int, tp: int) -> pd.DataFrame:
    """Bits per value by leg and part (pure bookkeeping over lowbit.wire.payload: cached by its inputs)."""
    return launch.store.bits.bits_parts(scheme, hidden, tp)


@st.cache_data(show_spinner=False, max_entries=256)
def bits_per_site(scheme: str, hidden: int, layers: int, tp: int) -> pd.DataFrame:
    return launch.store.bits.bits_per_site(scheme, hidden, layers, tp)


@st.cache_data(show_spinner=False, max_entries=256)
def traffic_per_token(scheme: str, hidden: int, layers: int, tp: int) -> dict:
    return launch.store.bits.traffic_per_token(scheme, hidden, layers, tp)


@st.cache_data(show_spinner=False)
def model_names() -> list[str]:
    return known_names()


@st.cache_data(show_spinner=False)
def model_sources() -> pd.DataFrame:
    return pd.DataFrame(describe_sources())


@st.cache_data(show_spinner=False)
def machine() -> dict:
    return launch.store.machine.machine_info()


@st.cache_resource(show_spinner=False, max_entries=8)
def _calibration_cached(folder: str, stamp: float):
    return load_calibration(folder)


def calibration(folder: str):
    """The calibration artifact in ``folder``, cached until its files change."""
    try:
        stamp = os.stat(Path(folder) / "calibration.safetensors").st_mtime
    except OSError:
        stamp = -1.0
    return _calibration_cached(folder, stamp)


# -- submitting ----------------------------------------------------------------------------------
def show_problems(exc: SpecError) -> None:
    """A refused spec: every (field, message) the launch module gave, verbatim."""
    lines = "\n".join(f"- `{field}: {message}`" for field, message in exc.problems)
    st.error(f"The job was not started. Fix these fields:\n\n{lines}", icon=":material/block:")


def submit(spec: dict, state_key: str | None = None) -> str | None:
    """Validate ``spec`` with ``JobSpec`` and queue it; show its problems on failure."""
    try:
        run_id = ensure_queue().submit(JobSpec.from_dict(spec))
    except SpecError as exc:
        show_problems(exc)
        return None
    if state_key:
        st.session_state[state_key] = run_id
    st.toast(f"Queued run {run_id}")
    return run_id


def show_progress(run_id: str, show_end: bool = True) -> str:
    """Progress bar and status of one run; returns its status. ``show_end=False``: a run that
    has just ended shows one caption line (the sidebar), not its error."""
    row = ensure_queue().get(run_id)
    status = row["status"] if row else "unknown"
    fraction, message, _ = run_progress(run_id, root())
    if status == "queued":
        ahead = len([r for r in ensure_queue().index.list(("queued", "running")) if r["id"] != run_id]) \
            if row else 0
        st.progress(0.0, text=f"queued ({ahead} run(s) ahead) · {run_id}")
    elif status in ("pending", "running"):  # pending: a Slurm job waiting, its reason in the message
        st.progress(fraction, text=f"{fraction * 100:.0f}% · {message}")
    elif status == "done":
        st.progress(1.0, text=f"done · {run_id}")
    elif not show_end:
        st.caption(f"{run_id} ended: {status}")
    else:
        st.error(f"Run {run_id} ended **{status}**.")
        if row and row.get("error"):
            st.code(row["error"], language=None)
    return status


# -- presentation --------------------------------------------------------------------------------
def style(fig: go.Figure, height: int = 480, legend_title: str | None = None) -> go.Figure:
    """Large fonts, white background, black axes: readable from the back of a classroom."""
    fig.update_layout(template="plotly_white", height=height, font=dict(size=FONT, color="#111"),
                      title_font=dict(size=FONT + 4), colorway=COLORS, margin=dict(l=70, r=30, t=60, b=60),
                      legend=dict(font=dict(size=FONT - 2), title=legend_title))
    axes = dict(title_font=dict(size=FONT + 2, color="#111"), tickfont=dict(size=FONT - 2, color="#111"),
                showline=True, linecolor="#111", gridcolor="#ddd", zeroline=False)
    fig.update_xaxes(**axes)
    fig.update_yaxes(**axes)
    return fig


def plot(fig: go.Figure, key: str | None = None) -> None:
    st.plotly_chart(fig, width="stretch", key=key, config=dict(displaylogo=False))


def scheme_colors(schemes) -> dict[str, str]:
    return {s: COLORS[i % len(COLORS)] for i, s in enumerate(dict.fromkeys(schemes))}


def empty_state(what: str, how: str) -> None:
    """What is missing and the one step that makes it appear, instead of an empty chart."""
    st.info(f"**{what}**\n\n{how}", icon=":material/info:")
    left, right = st.columns(2)
    with left:
        st.page_link("pages/overview.py", label="Run the classroom demo (Overview)", icon=":material/play_arrow:")
    with right:
        st.page_link("pages/runs.py", label="Start any run (Runs)", icon=":material/list:")


def pick_evaluate_run(label: str = "Evaluation run", key: str = "eval_run", need_layers: bool = False,
                      multi: bool = False, sweeps: bool = False):
    """A select box over done evaluate runs (and auto-tune sweeps with ``sweeps``), newest first;
    None (or []) when there are none."""
    frame = evaluate_runs(runs(), root(), sweeps=sweeps)
    if need_layers:
        frame = frame[frame["has_layers"]]
    if frame.empty:
        return [] if multi else None
    labels = dict(zip(frame["id"], frame["label"]))
    if multi:
        return st.multiselect(label, list(labels), default=list(labels)[:1], format_func=labels.get, key=key)
    return st.selectbox(label, list(labels), format_func=labels.get, key=key)


def download_csv(frame: pd.DataFrame, name: str, key: str) -> None:
    st.download_button("Download CSV", frame.to_csv(index=False).encode(), file_name=name, mime="text/csv",
                       key=key, icon=":material/download:")


def spec_json(spec: dict) -> str:
    return json.dumps(spec, indent=2, sort_keys=True)

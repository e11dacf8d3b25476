# Size: ~470 lines: the helpers every page shares (queue, cached store reads, forms, plot style); splitting is open work.
"""What every page shares: the app's job queue, cached reads of the results store, submitting a
spec with its problems shown verbatim, progress of a run, and the projector-friendly plot style.

Pages import it as ``from pages._ui import ...``; it is not a page itself (app.py lists the pages).
"""
from __future__ import annotations

import json
import math
import os
import textwrap
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

import launch.store.bits
import launch.store.calibration
import launch.store.evaluate
import launch.store.machine
from launch.layout import runs_root
from launch.queue import JobQueue, cancel
from launch.spec import JobSpec, SpecError
from launch.store.calibration import load_calibration
from launch.store.runs import active_runs, load_result, run_paths, run_progress, runs_frame, runs_stamp
from lowbit.model.models import TINY_CONFIGS, describe_sources, known_names
from lowbit.stats import fmt_num
from pages import _access, _server  # noqa: F401 - importing _server makes app.py draw every page

FONT = 18
# Okabe-Ito: distinguishable with colour-blindness and on a washed-out projector.
COLORS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"]
# one colour per bit part, in the accounting's order (payload, outliers, scales, indices)
PART_COLORS = dict(zip(launch.store.bits.SCHEME_PARTS, ("#0072B2", "#D55E00", "#009E73", "#CC79A7"), strict=True))
POLL_S = 1.0




def root() -> str:
    """The runs root this rerun reads (``$LOWBIT_RUNS`` or ./runs), as a cache key."""
    return str(runs_root())


def cancel_run(run_id: str) -> str | None:
    """Cancel a queued or running run (its whole process group); returns its status after, or None
    after showing why this session may not (viewer mode: checked here, not only by a hidden button)."""
    refusal = _access.cancel_refusal(run_id)
    if refusal:
        st.error(refusal, icon=":material/block:")
        return None
    return cancel(run_id, Path(root()))


def start_refusal() -> str | None:
    """Why this session may not start a job now (viewer mode), in one line; None if it may."""
    return _access.start_refusal(list(active_runs(root())["id"]))


def job_button(label: str, key: str, refusal: str | None, **kwargs) -> bool:
    """A button that starts or cancels a job: disabled with its one-line reason where this session
    may not (``refusal``). Its click still goes through ``submit`` / ``cancel_run``, which refuse
    on the server: a forged click does nothing."""
    if refusal:
        kwargs["help"] = refusal
    clicked = st.button(label, key=key, disabled=bool(refusal), **kwargs)
    if refusal:
        st.caption(refusal)
    return clicked


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


def live_active_runs(draw: Callable[[pd.DataFrame], None], every_s: float) -> None:
    """``draw(active runs)`` now; while a job is queued or running, again every ``every_s`` seconds
    in a fragment (only the fragment reruns). An idle page has no timer at all: the index is read
    once per full rerun (one query). When the last job ends the fragment asks for one full
    rerun, which draws the page without the timer (the browser drops it) and with the new results."""
    active = active_runs(root())
    if active.empty:
        draw(active)
        return

    def poll() -> None:
        now = active_runs(root())
        if now.empty:
            st.rerun()
        draw(now)

    st.fragment(poll, run_every=every_s)()


# -- cached reads --------------------------------------------------------------------------------
# Frames derived from the run files, cached once for every session and keyed by the files' stamp
# (launch.store.runs.runs_stamp: stat calls only), so 30 open pages do not each re-read every result.json.
def runs() -> pd.DataFrame:
    """Every run, as the index and the run directories say now."""
    return _runs(root(), runs_stamp(root()))


@st.cache_data(show_spinner=False, max_entries=8)
def _runs(root_dir: str, stamp: tuple) -> pd.DataFrame:
    return runs_frame(root_dir)


def calibration_sources() -> pd.DataFrame:
    """Every stored calibration artifact (launch.store.calibration.calibration_sources of ``runs()``)."""
    return _calibration_sources(root(), runs_stamp(root()))


@st.cache_data(show_spinner=False, max_entries=8)
def _calibration_sources(root_dir: str, stamp: tuple) -> pd.DataFrame:
    return launch.store.calibration.calibration_sources(_runs(root_dir, stamp), root_dir)


def evaluate_runs(sweeps: bool = False) -> pd.DataFrame:
    """Done evaluate runs (and sweeps) with scheme records (launch.store.evaluate.evaluate_runs)."""
    return _evaluate_runs(root(), runs_stamp(root()), sweeps)


@st.cache_data(show_spinner=False, max_entries=16)
def _evaluate_runs(root_dir: str, stamp: tuple, sweeps: bool) -> pd.DataFrame:
    return launch.store.evaluate.evaluate_runs(_runs(root_dir, stamp), root_dir, sweeps=sweeps)


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
MESSAGE_CHARS = 300


def clip(text: str, limit: int = MESSAGE_CHARS) -> str:
    """At most ``limit`` characters of ``text`` (a 5,000-character scheme must not fill the screen):
    its head and tail around a note of what was left out."""
    text = str(text)
    if len(text) <= limit:
        return text
    half = (limit - 40) // 2
    return f"{text[:half]} [... {len(text) - 2 * half:,} characters ...] {text[-half:]}"


def show_problems(exc: SpecError) -> None:
    """A refused spec: every (field, message) the launch module gave, verbatim up to ``clip``."""
    lines = "\n".join(f"- `{clip(field, 80)}: {clip(message)}`" for field, message in exc.problems)
    st.error(f"The job was not started. Fix these fields:\n\n{lines}", icon=":material/block:")


def range_problem(field: str, value, lo=None, hi=None) -> tuple[str, str] | None:
    """(field, message) when ``value`` lies outside [lo, hi], else None."""
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        allowed = f"between {lo:g} and {hi:g}" if lo is not None and hi is not None else \
            f"at least {lo:g}" if lo is not None else f"at most {hi:g}"
        return field, f"must be {allowed}, got {value:g}"
    return None


def number_field(label: str, key: str, value, problems: list, lo=None, hi=None, field: str | None = None,
                 **kwargs):
    """A number input whose range is checked here, not in the browser: a browser-side bound keeps
    the old value (or the default) without a word when a typed number is out of range, and a job
    would start with it. An out-of-range value is shown under the field, naming it and the value,
    and added to ``problems``, so the form's ``submit`` starts nothing."""
    value = st.number_input(label, value=value, key=key, **kwargs)
    problem = None if kwargs.get("disabled") else range_problem(field or label, value, lo, hi)
    if problem:
        st.error(f"`{problem[0]}: {problem[1]}`")
        problems.append(problem)
    return value


def submit(spec: dict, state_key: str | None = None, problems: list | None = None) -> str | None:
    """Validate ``spec`` with ``JobSpec`` (and the form's own ``problems``, and in class mode the
    viewer's rights and the class ceiling) and queue it; show every problem on failure."""
    refusal = start_refusal()
    if refusal:
        st.error(refusal, icon=":material/block:")
        return None
    spec, over_ceiling = _access.viewer_spec(spec)
    problems = list(problems or [])
    try:
        job = JobSpec.from_dict(spec)
    except SpecError as exc:
        named = {field for field, _ in problems}  # a field the form refused already: said once, in its words
        problems += [p for p in exc.problems if p[0] not in named]
    problems += over_ceiling
    if problems:
        show_problems(SpecError(problems))
        return None
    run_id = ensure_queue().submit(job)
    _access.record_owner(run_id)
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
        order = [r["id"] for r in ensure_queue().index.list(("queued", "running"))]
        ahead = order.index(run_id) if run_id in order else 0
        st.progress(0.0, text=f"queued ({ahead} run(s) ahead) · {run_id}")
    elif status in ("pending", "running"):  # pending: a Slurm job waiting, its reason in the message
        st.progress(fraction, text=f"{fraction * 100:.0f}% · {message}")
    elif status == "done":
        st.progress(1.0, text=f"done · {run_id}")
    elif not show_end:
        st.caption(f"{run_id} ended: {status}")
    elif status == "cancelled":  # someone chose to stop it: news, not an error
        st.info(f"Run {run_id} was cancelled{cancel_note(row)}.", icon=":material/stop_circle:")
    else:
        st.error(f"Run {run_id} ended **{status}**.")
        if row and row.get("error"):
            st.code(row["error"], language=None)
    return status


def cancel_note(row) -> str:
    """' (why, as the launcher recorded it)' for a cancelled run's row, or ''."""
    error = row.get("error") if row is not None else None
    return f" ({error})" if isinstance(error, str) and error else ""


# -- presentation --------------------------------------------------------------------------------
TITLE_CHARS = 56      # a title line of a full-width plot at 1280 px (22 px font)
NARROW_TITLE_CHARS = 32  # a title line of a plot in a half-width column
MODEBAR_PX = 36      # plotly's toolbar strip at the top right of every figure


def style(fig: go.Figure, height: int = 480, legend_title: str | None = None,
          title_chars: int = TITLE_CHARS) -> go.Figure:
    """Large fonts, white background, black axes: readable from the back of a classroom."""
    fig.update_layout(template="plotly_white", height=height, font=dict(size=FONT, color="#111"),
                      title_font=dict(size=FONT + 4), colorway=COLORS, margin=dict(l=70, r=30, t=60, b=60),
                      legend=dict(font=dict(size=FONT - 2), title=legend_title))
    axes = dict(title_font=dict(size=FONT + 2, color="#111"), tickfont=dict(size=FONT - 2, color="#111"),
                showline=True, linecolor="#111", gridcolor="#ddd", zeroline=False)
    fig.update_xaxes(**axes)
    fig.update_yaxes(**axes)
    return place_title(fig, title_chars, FONT + 4)


def place_title(fig: go.Figure, chars: int, font_px: int) -> go.Figure:
    """The title wrapped to ``chars`` characters a line, left-aligned just above the plot area
    (above facet labels when there are some), with the top margin sized to fit it below plotly's
    toolbar: at 1280 x 720 long centred titles were cut and the toolbar covered them."""
    text = fig.layout.title.text
    if not text:
        return fig
    lines = [line for part in text.split("<br>")
             for line in textwrap.wrap(part, chars, break_on_hyphens=False, break_long_words=False) or [""]]
    top_labels = any(a.yref == "paper" and (a.y or 0) >= 0.99 for a in fig.layout.annotations)
    below = 40 if top_labels else 14  # room under the title for facet labels on top of the plots
    line = font_px * 1.3
    total = fig.layout.height or 450  # plotly's default height
    # plotly anchors a title of n lines (n - 1) / 2 lines above its y; measured in Chromium at 1280 px
    y_px = MODEBAR_PX + 10 + (len(lines) - 1) * line / 2
    fig.update_layout(title=dict(text="<br>".join(lines), x=0, xref="paper", xanchor="left",
                                 y=1 - y_px / total, yref="container", yanchor="top"),
                      margin=dict(t=math.ceil(MODEBAR_PX + 4 + len(lines) * line + below)))
    return fig


def legend_below(fig: go.Figure) -> go.Figure:
    """The legend in rows under the plot: in a half-width column a legend on the right takes half the
    plot's width."""
    fig.update_layout(legend=dict(orientation="h", x=0, xanchor="left", y=-0.28, yanchor="top"))
    return fig


def plot(fig: go.Figure, key: str | None = None) -> None:
    st.plotly_chart(fig, width="stretch", key=key, config=dict(displaylogo=False))


def reference_line(fig: go.Figure, y: float, name: str, dash: str, color: str) -> None:
    """A horizontal line across the plot, named in the legend: a label written on the plot lands on
    a bar or a marker."""
    fig.add_hline(y=y, line=dict(dash=dash, color=color, width=2))
    fig.add_scatter(x=[None], y=[None], mode="lines", name=name, line=dict(dash=dash, color=color, width=2))


def log_ticks(values) -> dict:
    """Axis settings for a log axis over ``values``: one label per decade (10^k) when they span
    more than a decade and a half, else a few plain labels (plotly's own choice there writes every
    minor tick, "2, 10, 9, 8 ...", on top of each other)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v)) and float(v) > 0]
    if finite and math.log10(max(finite) / min(finite)) > 1.5:
        return dict(dtick=1, exponentformat="power")
    return dict(nticks=5, tickformat=".3g", exponentformat="power")


def integer_ticks(count: int, most: int = 12) -> dict:
    """Axis settings for 0..count-1 (layers, batches): whole numbers only, at most ``most`` labels."""
    return dict(tick0=0, dtick=max(1, math.ceil(count / most)), tickformat="d")


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
    frame = evaluate_runs(sweeps=sweeps)
    if need_layers:
        frame = frame[frame["has_layers"]]
    if frame.empty:
        return [] if multi else None
    labels = dict(zip(frame["id"], frame["label"]))
    if multi:
        return st.multiselect(label, list(labels), default=list(labels)[:1], format_func=labels.get, key=key)
    return st.selectbox(label, list(labels), format_func=labels.get, key=key)


def random_weights_note(models) -> None:
    """A caption when any of ``models`` is a tiny test model: its weights are random, so its
    perplexity (about the vocabulary size) says nothing about language."""
    tiny = sorted({str(m) for m in models if str(m) in TINY_CONFIGS})
    if tiny:
        st.caption(f"**{', '.join(tiny)}: random weights** (a test model that runs in seconds). Its perplexity is "
                   "about what guessing among its vocabulary gives and means nothing; compare schemes by KL and "
                   "top-1 agreement with the exact run, which are still real measurements of the communication.")


def blank_missing(frame: pd.DataFrame, formats: dict[str, str] | None = None) -> pd.DataFrame:
    """A display copy of ``frame`` whose missing values are empty cells (streamlit's table writes
    "None" for them): a numeric column with a gap becomes text, formatted with ``formats[column]``
    (default ``.4g``); a complete numeric column stays a number (it still sorts as one)."""
    formats = formats or {}
    out = frame.copy()
    for column in out.columns:
        values = out[column]
        if pd.api.types.is_bool_dtype(values) or pd.api.types.is_datetime64_any_dtype(values):
            continue
        if pd.api.types.is_numeric_dtype(values):
            if values.isna().any():
                out[column] = [fmt_num(v, formats.get(column, ".4g")) for v in values]
        else:
            out[column] = ["" if v is None or (pd.api.types.is_scalar(v) and pd.isna(v)) else v for v in values]
    return out


def number_columns(frame: pd.DataFrame, formats: dict[str, str]) -> dict:
    """``st.column_config`` number formats (printf style) for the columns of ``formats`` that are
    still numbers in ``frame`` (``blank_missing`` makes a column with gaps text, formatted already)."""
    return {c: st.column_config.NumberColumn(c, format=f) for c, f in formats.items()
            if c in frame and pd.api.types.is_numeric_dtype(frame[c])}


def download_csv(frame: pd.DataFrame, name: str, key: str) -> None:
    st.download_button("Download CSV", frame.to_csv(index=False).encode(), file_name=name, mime="text/csv",
                       key=key, icon=":material/download:")


def spec_json(spec: dict) -> str:
    return json.dumps(spec, indent=2, sort_keys=True)

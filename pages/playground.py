"""Playground: move a control, see at once what a scheme does to one real stored partial sum.

Reads a calibration's stored sample partials; every number comes from launch.store
.playground_view, which calls lowbit.playground (the payload codec, the real communicator on
threads, scheme_bits_breakdown)."""
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from launch.store.teaching import playground_counterpart, playground_view
from pages import _controls, _teach, _ui

st.title("Playground: one real partial, any scheme")
_teach.presentation_toggle("pg")
st.markdown(
    "**What you will learn:** what a quantizer does to the numbers a rank actually sends. Pick a layer, module and "
    "rank; every control change re-quantizes that stored partial, sums the ranks' messages with the real "
    "communicator and redraws. SQNR = 10 log10(||x||² / ||x̂ - x||²): higher is better, +6 dB per bit is the rule "
    "of thumb.")

picked = _teach.pick_sample("pg")
if picked is None:
    st.stop()
folder, cal, spiky = picked

c1, c2, c3 = st.columns(3)
with c1:
    bad: list = []
    layer = _ui.number_field("Layer", "pg_layer", spiky[0], bad, lo=0, hi=cal.layers - 1, step=1,
                             help="Starts at the stored partial with the largest max/RMS (the spikiest)")
with c2:
    module = st.radio("Module", ["o_proj", "down_proj"], index=["o_proj", "down_proj"].index(spiky[1]),
                      horizontal=True, key="pg_module")
with c3:
    rank = st.selectbox("Rank", list(range(cal.tp)), index=spiky[2], key="pg_rank")

c1, c2, c3, c4, c5 = st.columns(5)
with c1:
    code = _controls.pick_code("pg", help="int: uniform grid; nf: normal-quantile codebook (3 or 4 bits); fp: a "
                                          "saturating minifloat (FP8 E4M3 / E5M2, FP6, FP4 E2M1 as MXFP4 and NVFP4 "
                                          "send); lm: a Lloyd-Max codebook fitted on this calibration")
with c2:
    gran = st.selectbox("Granularity", _controls.granularity_names(), key="pg_gran",
                        help="static: one fp32 scale per feature from calibration (never sent); token: one BF16 "
                             "scale per token; group: one per G features of a token")
    groups = [g for g in (8, 16, 32, 64, 128) if cal.hidden % g == 0] or [cal.hidden]
    group = st.selectbox("Group size G", groups, index=groups.index(32) if 32 in groups else 0, key="pg_group",
                         disabled=not _controls.is_sized(gran))
with c3:
    outliers = st.radio("BF16 outliers", list(_controls.STATIC_SETS), key="pg_outliers",
                        help="topk: the features with the largest calibrated range (the paper); random: as many "
                             "random ones (the baseline); none")
    k = st.selectbox("Fraction kept", ["1/128", "1/64", "1/32", "1/16"], index=1, key="pg_k",
                     disabled=outliers == "none")
with c4:
    rotate = st.toggle("Rotation", key="pg_rot", disabled=not _controls.is_dynamic(gran),
                       help="Block Walsh-Hadamard rotation before quantizing (dynamic scales only)")
    blocks = [b for b in (16, 32, 64, 128) if cal.hidden % b == 0] or [cal.hidden]
    block = st.selectbox("Block R", blocks, index=blocks.index(64) if 64 in blocks else len(blocks) - 1,
                         key="pg_block", disabled=not rotate or not _controls.is_dynamic(gran))
with c5:
    stochastic = st.checkbox("Stochastic rounding", key="pg_sr", disabled=not _controls.allows_stochastic(code),
                             help="floor(v + u), u ~ U[0, 1): unbiased, but more variance per value")
    compare = st.toggle("Static vs dynamic side by side", value=True, key="pg_compare",
                        help="Also show the same scheme with the other kind of scales")

if bad:
    st.stop()
try:
    scheme = _controls.scheme_text(code, granularity=gran, group=int(group), outliers=outliers, k=k,
                                   rotation=int(block) if rotate else None,
                                   stochastic=bool(stochastic and _controls.allows_stochastic(code)))
except ValueError as exc:
    st.error(f"`{exc}`")
    st.stop()
schemes = [scheme] + ([playground_counterpart(scheme)] if compare else [])


@st.cache_data(show_spinner=False, max_entries=128)
def view(folder: str, stamp: float, layer: int, module: str, rank: int, scheme: str) -> dict:
    return playground_view(cal, layer, module, rank, scheme)


stamp = _teach.calibration_stamp(folder)
try:
    views = [view(folder, stamp, int(layer), module, int(rank), s) for s in schemes]
except ValueError as exc:  # PlaygroundError / SchemeError / CalibrationError name the field
    st.error(f"`{exc}`")
    st.stop()

st.subheader(" vs ".join(f"`{s}`" for s in schemes))
cols = st.columns(len(views))
for col, v, s in zip(cols, views, schemes):
    row = v["summary"].iloc[0]
    with col:
        m1, m2, m3 = st.columns(3)  # units in the labels: at 1280 px three values share half the page
        m1.metric(f"rank {int(rank)} SQNR (dB)", f"{row['rank_sqnr_db']:.2f}",
                  help=f"Rank {int(rank)}'s message, dequantized, against its partial")
        m2.metric("sum SQNR (dB)", f"{row['sum_sqnr_db']:.2f}",
                  help=f"The sum over the {int(row['tp'])} ranks as the communicator computes it, against the exact "
                       "fp32 sum")
        m3.metric("bits / value", f"{row['bits_per_value']:.4f}", help="Everything this rank sends, per value")
        st.caption(f"`{s}` · clamped values: **{int(row['clamped'])}** of {int(row['tokens']) * int(row['hidden'])}"
                   f" · BF16 features: {int(row['outliers'])} · message: {int(row['payload_bytes'])} bytes"
                   + (f" · two-shot first leg SQNR {row['first_leg_sqnr_db']:.2f} dB"
                      if pd.notna(row["first_leg_sqnr_db"]) else ""))


def histogram_figure(v: dict, s: str) -> go.Figure:
    h, grid = v["histogram"], v["grid"]
    fig = go.Figure()
    for kind, color in (("in range", "#0072B2"), ("clamped", "#D55E00")):
        part = h[h["kind"] == kind]
        fig.add_bar(x=part["center"], y=part["count"], width=(part["right"] - part["left"]), name=kind,
                    marker_color=color)
    if grid:  # one line trace per kind (an add_vline per level is a shape each, slow to lay out)
        top = max(2.0, float(h["count"].max()) * 2)
        levels = grid["levels"] if len(grid["levels"]) <= 64 else []
        for xs, name, line in ((levels, "grid levels", dict(color="#999", width=1)),
                               (grid["edges"], "range of the scale", dict(color="#111", width=2, dash="dash"))):
            if len(xs):
                fig.add_scatter(x=[v for q in xs for v in (q, q, None)], y=[0.7, top, None] * len(xs), mode="lines",
                                line=line, name=name, hoverinfo="skip")
    fig.update_layout(barmode="stack", bargap=0, title=f"{s}: values in steps, grid drawn",
                      xaxis_title="value / its step  (x - min) / scale", yaxis_title="count (log scale)")
    fig.update_yaxes(type="log", dtick=1)
    return fig


def feature_figure(v: dict, s: str) -> go.Figure:
    f = v["features"]
    fig = go.Figure()
    # the two errors often coincide: a wide pale line under a thin dashed one keeps both visible
    fig.add_scatter(x=f["feature"], y=f["rank_rms_error"], mode="lines", name=f"rank {int(rank)}'s message",
                    line=dict(color="#0072B2", width=6), opacity=0.45)
    fig.add_scatter(x=f["feature"], y=f["sum_rms_error"], mode="lines", name="sum over ranks",
                    line=dict(color="#009E73", width=2, dash="dot"))
    kept = f[f["bf16"]]
    if len(kept):
        fig.add_scatter(x=kept["feature"], y=kept["sum_rms_error"], mode="markers", name="kept in BF16",
                        marker=dict(color="#D55E00", size=10, symbol="diamond"))
    fig.update_layout(title=f"{s}: error per feature", xaxis_title="feature", yaxis_title="RMS error over tokens")
    return fig


@st.cache_resource(show_spinner=False, max_entries=128)  # not cache_data: unpickling a figure re-validates it
def scheme_figures(folder: str, stamp: float, layer: int, module: str, rank: int, scheme: str, present: bool):
    """(histogram or None, per-feature error) of one scheme, styled: cached, so the side-by-side
    scheme that did not change costs nothing (building a plotly figure is a visible part of a rerun)."""
    v = view(folder, stamp, layer, module, rank, scheme)
    narrow = _ui.NARROW_TITLE_CHARS  # drawn in a column of half the page when two schemes are compared
    hist = _ui.legend_below(_teach.style(histogram_figure(v, scheme), 480, title_chars=narrow)) if v["grid"] else None
    return hist, _ui.legend_below(_teach.style(feature_figure(v, scheme), 440, title_chars=narrow))


figs = [scheme_figures(folder, stamp, int(layer), module, int(rank), s, _teach.presenting()) for s in schemes]
for col, (hist, _), i in zip(st.columns(len(views)), figs, range(len(views))):
    with col:
        if hist is None:
            st.info("An exact scheme has no grid.")
            continue
        _teach.show(hist, key=f"pg_hist_{i}",
                    what="every value of the message divided by the step it was quantized with; grey lines are "
                         "the levels codes decode to, dashed lines the range the scale covers; orange values lie "
                         "outside and are clamped to the end code.")

for col, (_, feat), i in zip(st.columns(len(views)), figs, range(len(views))):
    with col:
        _teach.show(feat, key=f"pg_feat_{i}",
                    what="how far each feature's dequantized value is from the original, for this rank's message "
                         "and for the sum of all ranks; BF16 features (diamonds) are nearly exact.")

def bits_figure(views: list[dict], schemes: list[str]) -> go.Figure:
    bits = [v["bits"].assign(scheme=s) for v, s in zip(views, schemes)]
    fig = go.Figure()
    for part in ("payload", "outliers", "scales", "indices"):
        for b in bits:
            rows = b[b["part"] == part]
            fig.add_bar(x=[f"{r.scheme} · {r.leg}" for r in rows.itertuples()], y=rows["bits"], name=part,
                        marker_color=_ui.PART_COLORS[part], legendgroup=part, showlegend=b is bits[0])
    fig.update_layout(barmode="stack", title="Bits per value by part", yaxis_title="bits per value", xaxis_title="")
    return fig


def sqnr_figure(views: list[dict], schemes: list[str], rank: int) -> go.Figure:
    sq = [dict(scheme=s, what=w, sqnr=v["summary"].iloc[0][c]) for v, s in zip(views, schemes)
          for w, c in ((f"rank {rank}'s message", "rank_sqnr_db"), ("sum over ranks", "sum_sqnr_db"))]
    fig = go.Figure()
    for what, color in ((f"rank {rank}'s message", "#0072B2"), ("sum over ranks", "#009E73")):
        rows = [r for r in sq if r["what"] == what]
        fig.add_bar(x=[r["scheme"] for r in rows], y=[r["sqnr"] for r in rows], name=what, marker_color=color,
                    text=[f"{r['sqnr']:.1f}" for r in rows], textposition="outside")
    fig.update_layout(barmode="group", title="Error of one message and of the sum over ranks",
                      yaxis_title="SQNR (dB, higher is better)")
    return fig


@st.cache_resource(show_spinner=False, max_entries=128)  # shared by every session: a class moves the same controls
def summary_figures(folder: str, stamp: float, layer: int, module: str, rank: int, schemes: tuple, present: bool):
    """(bits by part, SQNR of one message and of the sum) for the shown schemes, styled."""
    views = [view(folder, stamp, layer, module, rank, s) for s in schemes]
    return (_teach.style(bits_figure(views, list(schemes)), 400),
            _teach.style(sqnr_figure(views, list(schemes), rank), 380))


bits_fig, sqnr_fig = summary_figures(folder, stamp, int(layer), module, int(rank), tuple(schemes), _teach.presenting())
_teach.show(bits_fig, key="pg_bits",
            what="what each value costs on the wire, from the payload layout: the codes, the BF16 outlier "
                 "features, the dynamic scales and any index lists (two-shot: both legs).")
_teach.show(sqnr_fig, key="pg_sum",
            what="independent ranks' rounding errors add in power, and so does the signal of uncorrelated partials: "
                 "the sum's SQNR stays near one message's, lower where partials cancel, higher where they line up.")

"""Where it pays: the alpha-beta model of the all-reduce (lowbit.method.projection) on named links and
the emulated ones, bf16 against each scheme by message size, the crossover marked, the chosen
model's decode- and prefill-sized messages shaded, and measured collective-bench records from the
results store drawn over the model lines.

Numbers from launch.store.teaching.projection_frame / crossovers / message_sizes / fitted_links
(lowbit.playground -> lowbit.method.projection)."""
import math

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from launch.store.teaching import (crossovers, fitted_links, link_choices, measured_link_records, message_sizes,
                                   projection_frame, projection_hidden)
from pages import _teach, _ui

st.title("Where it pays: time per all-reduce by message size")
_teach.presentation_toggle("wp")
st.markdown(
    "**What you will learn:** when fewer bits make the all-reduce faster. Each step of a collective costs a fixed "
    "latency α plus bytes / bandwidth β; quantizing adds codec time. Small messages (decode) are latency-bound, so "
    "fewer bytes barely help; large ones (prefill) are bandwidth-bound. **A model, not a measurement**: link "
    "numbers are nominal data-sheet figures derated to what collectives reach; measured runs are drawn as dots.")

links = link_choices()
bench = measured_link_records(_ui.runs(), _ui.root())
c1, c2, c3, c4 = st.columns(4)
with c1:
    picked = st.multiselect("Links", list(links), default=["nvlink4", "pcie4", "eth100", "ib400", "emu1gbit"],
                            format_func=links.get, key="wp_links")
with c2:
    tp = st.selectbox("TP size", [2, 3, 4, 8], index=3, key="wp_tp")
with c3:
    models = ["llama2-13b", "gemma2-27b", *[m for m in _ui.model_names() if m not in ("llama2-13b", "gemma2-27b")]]
    model = st.selectbox("Model (its hidden size and message sizes)", models, key="wp_model")
with c4:
    bad: list = []
    codec = _ui.number_field("Codec speed (GB/s of memory traffic)", "wp_codec", 2680.0, bad, lo=1.0, step=100.0,
                             help="Quantize + dequantize modelled as memory-bound at this rate; 2680 = 80% of an "
                                  "H100's 3350 GB/s HBM (lowbit.method.projection's assumption). Lower it to see a "
                                  "slow codec eat the gain.")
c1, c2, c3 = st.columns(3)
with c1:
    schemes = st.multiselect("Schemes", ["int4-static-top1/64", "int4-static-top1/64@twoshot+int8-token",
                                         "int4-static-top1/64@twoshot+int4-token", "int8-token@twoshot+int8-token",
                                         "int2-static@twoshot+int2-token", "int4-group32@twoshot+int8-token"],
                             default=["int4-static-top1/64", "int4-static-top1/64@twoshot+int8-token"], key="wp_schemes")
with c2:
    prompt = _ui.number_field("Prompt tokens (prefill)", "wp_prompt", 2048, bad, lo=1, hi=65536, step=1)
with c3:
    batch = _ui.number_field("Sequences per batch", "wp_batch", 1, bad, lo=1, hi=1024, step=1)
if bad:
    st.stop()

fits = fitted_links(bench, int(tp)) if len(bench) else {}
fit_pick = st.multiselect("Links fitted to your collective-bench runs (TP " + str(int(tp)) + ")", list(fits),
                          default=list(fits), key="wp_fits") if fits else []
if not picked and not fit_pick:
    st.info("Pick at least one link.")
    st.stop()

try:
    hidden = projection_hidden(model)
    sizes = message_sizes(model, int(prompt), int(batch))
    frames = {links[k]: projection_frame(k, int(tp), hidden, schemes, float(codec)) for k in picked}
    frames.update({name: projection_frame(fits[name], int(tp), hidden, schemes, float(codec))
                   for name in fit_pick})
except ValueError as exc:  # named field errors: a scheme that does not fit this hidden size / TP
    st.error(f"`{exc}`")
    st.stop()

colors = _ui.scheme_colors(["bf16", *schemes])
table = []
for i, (name, frame) in enumerate(frames.items()):
    fig = go.Figure()
    for s in ["bf16", *schemes]:
        part = frame[frame["scheme"] == s]
        fig.add_scatter(x=part["message_mib"], y=part["us"], mode="lines", name=s, line=dict(color=colors[s]))
    cross = crossovers(frame)
    for r in cross.dropna(subset=["tokens"]).itertuples():
        fig.add_scatter(x=[r.message_mib], y=[r.scheme_us], mode="markers", name=f"crossover: {r.scheme}",
                        marker=dict(size=16, symbol="star", color=colors[r.scheme], line=dict(color="#111", width=1)))
    bands = [(label, size, color) for label, size, color in (
        ("decode", sizes["decode"], "rgba(0,158,115,0.18)"), ("prefill", sizes["prefill"], "rgba(230,159,0,0.22)"))]
    fig.update_layout(  # set at once: add_vrect per band is slow
        shapes=[dict(type="rect", xref="x", yref="paper", x0=sz["mib"] / 1.4, x1=sz["mib"] * 1.4,
                     y0=0, y1=1, fillcolor=color, line_width=0, layer="below") for _, sz, color in bands],
        annotations=[dict(xref="x", yref="paper", x=math.log10(sz["mib"]), y=1.02, showarrow=False,
                          text=f"{label}: {sz['tokens']} tok") for label, sz, _ in bands])
    key = next((k for k, v in links.items() if v == name), None)
    measured = bench[(bench["link_key"] == key) & (bench["tp"] == int(tp))] if key and len(bench) else bench.iloc[0:0]
    if name in fits:
        measured = bench[(bench["link"].astype(str) + f" fitted (TP {int(tp)})" == name) & (bench["tp"] == int(tp))]
    for (method, scheme), g in measured.groupby(["method", "scheme"]) if len(measured) else []:
        fig.add_scatter(x=g["message_mib"], y=g["median_ms"] * 1e3,
                        mode="markers", name=f"measured: {method} {scheme}",
                        marker=dict(size=11, symbol="circle-open", line=dict(width=2)))
    fig.update_xaxes(type="log", dtick=1, exponentformat="power", title="message per rank (MiB in BF16)")
    fig.update_yaxes(type="log", dtick=1, exponentformat="power", title="time per all-reduce (µs)")
    fig.update_layout(title=f"{name}, TP {int(tp)}, {model} (hidden {hidden})")
    _teach.plot(fig, key=f"wp_fig_{i}", height=460,
                what="modelled time of one all-reduce against message size (log-log); stars mark where a scheme "
                     "starts to beat BF16, shaded bands the decode and prefill messages, open circles measured runs.")
    table += [dict(link=name, **r) for r in cross.to_dict("records")]

st.subheader("Crossover: smallest message from which each scheme stays faster than BF16")
st.dataframe(_ui.blank_missing(pd.DataFrame(table), dict(tokens=".0f", message_mib=".3g", bf16_us=".1f",
                                                          scheme_us=".1f")), hide_index=True, width="stretch")
st.caption("Empty cells: from no size up to 65536 tokens on is the scheme faster than BF16 at every larger size "
           "(gather at large TP can win tiny, latency-bound messages -- it has N-1 steps to the ring's 2(N-1) -- but "
           "moves more bytes than the BF16 ring on large ones). Interconnects: " + "; ".join(
               f"{v}" for v in links.values()) + ". Emulated links: nominal rate x 0.956 TCP goodput, α fitted to "
           "bench/results/collectives-tp3-576-links.json.")

"""Outliers: are the same features outliers across inputs, layers and ranks?

Reads calibration artifacts (per-feature EMA ranges of each rank's partial sum) that calibrate
and evaluate runs wrote; starts calibrate runs for other text sources."""
from fractions import Fraction

import numpy as np
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from launch.store.calibration import calibration_sources
from launch.store.problems import StoreProblem
from lowbit.analysis import (ema_trace_frame, feature_ranges, outlier_count, overlap_between_batches,
                             overlap_between_layers, overlap_between_ranks, overlap_between_sources, random_jaccard,
                             range_heatmap, selected_features)
from lowbit.model.data import TEXT_SOURCES
from lowbit.site import ROW_PARALLEL_MODULES
from pages import _ui

K_CHOICES = {"1/128": Fraction(1, 128), "1/64 (paper)": Fraction(1, 64), "1/32": Fraction(1, 32),
             "1/16": Fraction(1, 16)}

st.title("Outliers: are they the same features every time?")
st.markdown(
    "**What you will learn:** the partial sums that ranks exchange have a few features with a much larger range "
    "than the rest. If those features are the same for every input, batch, rank and layer, a fixed list of them "
    "can be sent in BF16 while everything else goes in 4 bits -- the paper's method. The range of a feature is "
    "2 x max(|min|, |max|) of its values, averaged over calibration batches (EMA, gamma 0.01).")


def new_calibration_form(key: str, model: str | None = None, tp: int | None = None, source: str | None = None,
                         tokens: int = 2048, seq_len: int = 128) -> None:
    """Controls for a calibrate job; the spec goes through JobSpec validation."""
    names = _ui.model_names()
    c1, c2, c3, c4 = st.columns(4)
    with c1:
        m = st.selectbox("Model", names, index=names.index(model) if model in names else 0, key=f"{key}_model")
    sizes = _ui.valid_tp_sizes(m)
    with c2:
        t = st.selectbox("TP size", sizes, index=sizes.index(tp) if tp in sizes else 0, key=f"{key}_tp")
    with c3:
        s = st.selectbox("Text source", TEXT_SOURCES,
                         index=TEXT_SOURCES.index(source) if source in TEXT_SOURCES else 0, key=f"{key}_source")
    problems: list = []
    with c4:
        n = _ui.number_field("Calibration tokens", f"{key}_tokens", int(tokens), problems, lo=1, step=256,
                             field="calib_tokens")
    if _ui.job_button("Start calibration", key=f"{key}_go", refusal=_ui.start_refusal(),
                      icon=":material/play_arrow:"):
        _ui.submit(dict(kind="calibrate", model=m, tp=int(t), calib_data=s, calib_tokens=int(n),
                        params=dict(seq_len=int(seq_len))), problems=problems)


sources = _ui.calibration_sources()
if sources.empty:
    _ui.empty_state("No calibration yet.",
                    "A calibration records every feature's range on each rank. The classroom demo makes one; or "
                    "start one here (tiny-llama takes seconds, smollm2-135m about a minute).")
    new_calibration_form("cal_empty", model="smollm2-135m", tp=3)
    st.stop()

labels = dict(zip(sources["folder"], sources["label"]))
folder = st.selectbox("Calibration", list(labels), format_func=labels.get, key="cal_folder")
meta = sources[sources["folder"] == folder].iloc[0]
try:
    cal = _ui.calibration(folder)
except StoreProblem as problem:  # missing, older or unreadable artifact: said, the page stops here
    st.error(f"This calibration cannot be loaded: {problem}")
    st.stop()

modules = list(cal.meta.get("modules") or ROW_PARALLEL_MODULES)
c1, c2, c3, c4 = st.columns(4)
with c1:
    module = st.radio("Module", modules, horizontal=True, key="cal_module",
                      help="o_proj: after attention; down_proj: after the MLP")
with c2:
    layer = st.slider("Layer", 0, cal.layers - 1, min(cal.layers - 1, 2), key="cal_layer")
with c3:
    k_label = st.selectbox("Features kept in BF16 (k)", list(K_CHOICES), index=1, key="cal_k")
with c4:
    log_y = st.toggle("Log scale", value=True, key="cal_log")
k_frac = K_CHOICES[k_label]
k = max(1, outlier_count(cal.hidden, k_frac))
selected = selected_features(cal, layer, module, k_frac) if outlier_count(cal.hidden, k_frac) else []
baseline = random_jaccard(cal.hidden, k)
st.caption(f"{cal.meta.get('model')} · TP {cal.tp} · {cal.layers} layers · hidden {cal.hidden} · "
           f"{cal.meta.get('batches')} batches of {cal.meta.get('source')} text ({cal.meta.get('tokens')} tokens) · "
           f"k = {k} feature(s) · top-k at layer {layer} {module}: {selected}")

# -- per-feature range, one line per rank -----------------------------------------------------------
st.header("Range of every feature, one line per rank")
ranges = feature_ranges(cal, layer, module)
ranges["rank"] = "rank " + ranges["rank"].astype(str)
fig = px.line(ranges, x="feature", y="range", color="rank", log_y=log_y,
              labels=dict(feature="feature (hidden channel index)", range="range (activation units)", rank=""))
for f in selected:
    fig.add_vline(x=f, line=dict(color="#D55E00", width=1, dash="dot"))
fig.update_layout(title=f"Layer {layer} {module}: dotted lines = the {k} feature(s) the paper keeps in BF16")
if log_y:
    fig.update_yaxes(**_ui.log_ticks(ranges["range"]))
_ui.plot(_ui.style(fig, height=460), key="cal_ranges")
st.markdown("If the spikes line up across the rank lines, every rank's partial has the **same** outlier features: "
            "one shared index list is enough.")

# -- layer x feature heatmap ------------------------------------------------------------------------
st.header("Every layer at once")
heat = range_heatmap(cal, module)
fig = go.Figure(go.Heatmap(z=np.log10(np.maximum(heat, 1e-6)), colorscale="Viridis",
                           colorbar=dict(title=dict(text="log10 range", font=dict(size=_ui.FONT)))))
fig.update_layout(title=f"{module}: range summed over ranks (log10)", xaxis_title="feature (hidden channel index)",
                  yaxis_title="layer")
_ui.plot(_ui.style(fig, height=max(360, 16 * cal.layers + 160)), key="cal_heat")
st.markdown("Bright vertical stripes are features that are outliers in many layers.")

# -- overlaps ----------------------------------------------------------------------------------------
st.header("Overlap of the top-k sets (Jaccard)")
st.markdown(f"Jaccard = |A ∩ B| / |A ∪ B|: **1** means the same {k} feature(s), and two *random* sets of {k} "
            f"out of "
            f"{cal.hidden} would overlap about **{baseline:.3f}** (dashed line).")
tab_b, tab_r, tab_l, tab_s = st.tabs(["Between batches", "Between ranks", "Between layers", "Between text sources"])
with tab_b:
    by_batch = overlap_between_batches(cal, module, k)
    if cal.batch_min.shape[0] < 2:
        st.info("This calibration has a single batch; a longer calibration shows batch-to-batch consistency.")
    stats = by_batch.groupby("layer")["jaccard"].agg(["mean", "min", "max"]).reset_index()
    fig = go.Figure(go.Scatter(x=stats["layer"], y=stats["mean"], mode="lines+markers", name="mean over batches",
                               error_y=dict(type="data", symmetric=False, array=stats["max"] - stats["mean"],
                                            arrayminus=stats["mean"] - stats["min"])))
    fig.add_hline(y=baseline, line=dict(dash="dash", color="#555"), annotation_text="random sets")
    fig.update_layout(title=f"{module}: each batch's top-k vs the selected set (bars: min-max over batches)",
                      xaxis_title="layer", yaxis_title="Jaccard overlap", yaxis_range=[0, 1.05])
    fig.update_xaxes(**_ui.integer_ticks(cal.layers))
    _ui.plot(_ui.style(fig, height=420), key="cal_batches")
with tab_r:
    by_rank = overlap_between_ranks(cal, layer, module, k)
    fig = px.imshow(by_rank, zmin=0, zmax=1, text_auto=".2f", color_continuous_scale="Blues",
                    labels=dict(color="Jaccard"))
    fig.update_layout(title=f"Layer {layer} {module}: each rank's own top-k", xaxis_title="rank", yaxis_title="rank")
    _ui.plot(_ui.style(fig, height=420), key="cal_ranks")
with tab_l:
    by_layer = overlap_between_layers(cal, module, k)
    fig = px.imshow(by_layer, zmin=0, zmax=1, color_continuous_scale="Blues", labels=dict(color="Jaccard"))
    fig.update_layout(title=f"{module}: selected top-k of every pair of layers", xaxis_title="layer",
                      yaxis_title="layer")
    _ui.plot(_ui.style(fig, height=max(420, 14 * cal.layers + 160)), key="cal_layers")
with tab_s:
    peers = sources[(sources["model"] == meta["model"]) & (sources["tp"] == meta["tp"]) &
                    (sources["folder"] != folder)]
    if peers.empty:
        other = next((s for s in TEXT_SOURCES if s != meta["source"]), "shakespeare")
        st.info(f"No second calibration of {meta['model']} at TP {meta['tp']} yet. Calibrate on another text "
                f"(e.g. {other}) and compare which features are selected.")
        new_calibration_form("cal_other", model=meta["model"], tp=int(meta["tp"]), source=other,
                             tokens=int(meta["tokens"] or 2048), seq_len=int(cal.meta.get("seq_len") or 128))
    else:
        peer_labels = dict(zip(peers["folder"], peers["label"]))
        other_folder = st.selectbox("Compare with", list(peer_labels), format_func=peer_labels.get, key="cal_peer")
        try:
            by_source = overlap_between_sources(cal, _ui.calibration(other_folder), k)
        except StoreProblem as problem:  # the other artifact is missing, older or unreadable
            st.error(f"Cannot compare with that calibration: {problem}")
        else:
            other_meta = peers[peers["folder"] == other_folder].iloc[0]
            fig = px.line(by_source, x="layer", y="jaccard", color="module", markers=True,
                          labels=dict(layer="layer", jaccard="Jaccard overlap", module=""))
            fig.update_xaxes(**_ui.integer_ticks(cal.layers))
            fig.add_hline(y=baseline, line=dict(dash="dash", color="#555"), annotation_text="random sets")
            fig.update_layout(title=f"Selected features: {meta['source']} vs {other_meta['source']} text",
                              yaxis_range=[0, 1.05])
            _ui.plot(_ui.style(fig, height=420), key="cal_sources")

# -- EMA trace ---------------------------------------------------------------------------------------
st.header("How the range estimate settles during calibration")
ranked = feature_ranges(cal, layer, module).groupby("feature")["range"].sum().sort_values(ascending=False)
default_feature = int(ranked.index[0])
bad: list = []
feature = _ui.number_field("Feature", "cal_feature", default_feature, bad, lo=0, hi=cal.hidden - 1, step=1,
                           help="Defaults to the widest feature at this layer and module.")
if bad:
    st.stop()
trace = ema_trace_frame(cal, layer, module, int(feature))
fig = go.Figure()
fig.add_trace(go.Scatter(x=trace["batch"], y=trace["batch_range"], mode="markers", name="this batch",
                         marker=dict(size=11, color="#999")))
fig.add_trace(go.Scatter(x=trace["batch"], y=trace["ema_range"], mode="lines+markers", name="EMA (the static scale)",
                         line=dict(width=3, color="#0072B2")))
fig.update_layout(title=f"Feature {int(feature)}, layer {layer} {module} (summed over ranks)",
                  xaxis_title="calibration batch", yaxis_title="range (activation units)")
fig.update_xaxes(**_ui.integer_ticks(len(trace)))  # batches are whole numbers (plotly chose steps of 0.2)
_ui.plot(_ui.style(fig, height=420), key="cal_ema")
st.caption("With gamma = 0.01 the EMA moves 1 % of the way to each new batch: a spike in one batch barely moves the "
           "scale, so a later, larger value is clamped (Layer error page shows the cost).")

with st.expander("Start another calibration"):
    new_calibration_form("cal_more", model=meta["model"], tp=int(meta["tp"]), source=meta["source"],
                         tokens=int(meta["tokens"] or 2048), seq_len=int(cal.meta.get("seq_len") or 128))

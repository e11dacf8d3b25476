"""Two-shot, step by step: each rank's chunks quantized and sent, the owners' fp32 sums and
requantization, the all-gather; the error after each phase on a real stored partial, next to the
BF16 ring all-reduce and the gather of the same code; bytes per rank as TP grows.

Numbers from launch.store.teaching.two_shot_view / bytes_by_tp (lowbit.playground: the real
communicator on threads, the payload layout)."""
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from launch.store.teaching import bytes_by_tp, two_shot_view
from pages import _teach, _ui

st.title("Two-shot, step by step")
_teach.presentation_toggle("ts")
st.markdown(
    "**What you will learn:** how the two-shot all-reduce moves fewer bytes than gathering everyone's quantized "
    "partial. The hidden features are cut into one chunk per rank; rank j *owns* chunk j. **Phase 1**: every "
    "rank quantizes each chunk and sends it to its owner (all-to-all). The owner dequantizes the chunks, sums "
    "them in fp32 and **requantizes** the sum. **Phase 2**: every owner sends its reduced chunk to everyone "
    "(all-gather).")

picked = _teach.pick_sample("ts")
if picked is None:
    st.stop()
folder, cal, spiky = picked
c1, c2, c3, c4, c5 = st.columns(5)
with c1:
    bad: list = []
    layer = _ui.number_field("Layer", "ts_layer", spiky[0], bad, lo=0, hi=cal.layers - 1, step=1)
with c2:
    module = st.radio("Module", ["o_proj", "down_proj"], index=["o_proj", "down_proj"].index(spiky[1]),
                      horizontal=True, key="ts_module")
with c3:
    first = st.selectbox("First leg", ["int4-static-top1/64", "int4-static", "int4-token", "int8-token",
                                       "int2-static", "int4-group32"], key="ts_first",
                         help="What each rank sends in phase 1")
with c4:
    second = st.selectbox("Second leg (requantization)", ["int8-token", "int4-token", "int6-token"], key="ts_second",
                          help="What owners send in phase 2: dynamic scales only (no calibration exists for a sum)")
with c5:
    tokens_for_tp = _ui.number_field("Tokens (bytes by TP)", "ts_tokens", 2048, bad, lo=1, hi=65536, step=1,
                                     help="Message length for the bytes-per-rank curve")
if bad:
    st.stop()
scheme = f"{first}@twoshot+{second}"


@st.cache_data(show_spinner=False, max_entries=64)
def view(folder: str, stamp: float, layer: int, module: str, scheme: str) -> dict:
    return two_shot_view(cal, layer, module, scheme)


try:
    v = view(folder, _teach.calibration_stamp(folder), int(layer), module, scheme)
except ValueError as exc:  # named field errors (e.g. hidden not divisible by the TP size)
    st.error(f"`{exc}`")
    st.stop()

tp, width = v["tp"], v["width"]
steps = ["1. Cut into chunks", "2. Phase 1: send chunks to owners", "3. Owners sum and requantize",
         "4. Phase 2: all-gather", "5. Compare"]
step = st.radio("Step", steps, horizontal=True, key="ts_step")
phases = v["phases"].set_index("step")
links = v["links"]
st.caption(f"`{v['scheme']}` on layer {int(layer)} {module}: TP {tp}, {v['tokens']} stored tokens x {v['hidden']} "
           f"features, {tp} chunks of {width} features (BF16 outlier features per chunk: "
           f"{', '.join(map(str, v['chunk_outliers']))}).")

if step == steps[0]:
    fig = go.Figure()
    for j in range(tp):
        fig.add_bar(x=[width], y=["features"], orientation="h", name=f"chunk {j}: owner rank {j}",
                    text=[f"chunk {j} -> rank {j}"], textposition="inside")
    fig.update_layout(barmode="stack", title="The hidden vector, cut into one chunk per rank",
                      xaxis_title="features", yaxis_title="")
    _teach.plot(fig, key="ts_chunks", height=260,
                what=f"{v['hidden']} features in {tp} equal chunks; chunk j is reduced by rank j, which owns it.")
elif step == steps[1]:
    p1 = links[links["phase"] == 1].pivot(index="sender", columns="receiver", values="bytes")
    fig = px.imshow(p1, text_auto=True, color_continuous_scale="Blues",
                    labels=dict(x="receiver (owner of the chunk)", y="sender", color="bytes"))
    fig.update_layout(title="Phase 1 (all-to-all): bytes on each link")
    _teach.plot(fig, key="ts_phase1", height=420,
                what=f"each rank sends its quantized chunk j to rank j: {tp - 1} messages per rank; its own chunk "
                     "stays local (empty diagonal).")
    st.metric("After phase 1: SQNR of the owners' fp32 sums", f"{phases.loc[phases.index[0], 'sqnr_db']:.2f} dB")
elif step == steps[2]:
    m1, m2 = st.columns(2)
    m1.metric("Owners' fp32 sums (before requantizing)", f"{phases.iloc[0]['sqnr_db']:.2f} dB")
    m2.metric(f"After requantizing with {second}", f"{phases.iloc[1]['sqnr_db']:.2f} dB",
              delta=f"{phases.iloc[1]['sqnr_db'] - phases.iloc[0]['sqnr_db']:.2f} dB")
    fig = go.Figure()
    fig.add_bar(x=[f"chunk {j}" for j in range(tp)], y=v["leg1_bytes"], name="one phase-1 message (bytes)")
    fig.add_bar(x=[f"chunk {j}" for j in range(tp)], y=[v["leg2_bytes"]] * tp, name="requantized chunk, padded (bytes)")
    fig.update_layout(barmode="group", title="Message sizes: first leg vs the requantized chunk",
                      yaxis_title="bytes")
    _teach.plot(fig, key="ts_requant", height=380,
                what="the owner's sum is quantized a second time, with its own bits and per-token scales; every "
                     "owner pads to the largest chunk so the all-gather has one size.")
elif step == steps[3]:
    p2 = links[links["phase"] == 2].pivot(index="sender", columns="receiver", values="bytes")
    fig = px.imshow(p2, text_auto=True, color_continuous_scale="Greens",
                    labels=dict(x="receiver", y="sender (owner)", color="bytes"))
    fig.update_layout(title="Phase 2 (all-gather): bytes on each link")
    _teach.plot(fig, key="ts_phase2", height=420,
                what="every owner sends its requantized reduced chunk to the other ranks; afterwards every rank "
                     "holds the whole sum.")
    st.metric("After phase 2: SQNR of the sum every rank holds", f"{phases.iloc[1]['sqnr_db']:.2f} dB")
else:
    fig = go.Figure()
    fig.add_bar(x=v["phases"]["step"], y=v["phases"]["sqnr_db"],
                text=[f"{x:.1f}" for x in v["phases"]["sqnr_db"]], textposition="outside",
                marker_color=["#0072B2", "#0072B2", "#000000", "#D55E00"])
    fig.update_layout(title="Error of the sum after each step vs BF16 ring and gather", yaxis_title="SQNR (dB)")
    _teach.plot(fig, key="ts_compare", height=420,
                what="two-shot's first phase matches the gather of the same code; the requantization costs a "
                     "little more; the BF16 ring all-reduce is nearly exact.")
    sent = v["sent"]
    fig = go.Figure(go.Bar(x=sent["method"], y=sent["bytes"], text=[f"{b:,.0f}" for b in sent["bytes"]],
                           textposition="outside"))
    fig.update_layout(title=f"Bytes each rank sends for this message (TP {tp})", yaxis_title="bytes")
    _teach.plot(fig, key="ts_sent", height=380,
                what="the gather sends its whole payload to every other rank; two-shot sends each chunk once and "
                     "one reduced chunk to each peer.")

st.subheader("Why gather stops saving bytes at large TP")
try:
    by_tp = bytes_by_tp(scheme, v["hidden"], int(tokens_for_tp))
except ValueError as exc:
    st.error(f"`{exc}`")
    st.stop()
fig = px.line(by_tp, x="tp", y="ratio_vs_bf16", color="method", markers=True,
              labels=dict(tp="TP size (ranks)", ratio_vs_bf16="bytes per rank / BF16 ring all-reduce", method=""))
fig.add_hline(y=1.0, line=dict(dash="dash", color="#111"), annotation_text="as many bytes as BF16")
fig.update_layout(title=f"Bytes each rank sends, relative to BF16 ({int(tokens_for_tp)} tokens x {v['hidden']})")
_teach.plot(fig, key="ts_by_tp", height=440,
            what="the BF16 ring sends 2(N-1)/N of the message, gather (N-1) quantized payloads -- growing with N -- "
                 "and two-shot (N-1)/N of both legs, so only two-shot keeps its saving as TP grows.")

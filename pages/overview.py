"""Overview: what tensor parallelism communicates, where, how many bytes, and the paper's idea;
one button runs the classroom demo (launch.presets.demo_spec) and shows its result."""
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from launch import results
from launch.index import ACTIVE
from launch.presets import DEMO_LONGER, DEMO_SCHEMES, demo_spec
from pages import _ui

st.title("lowbit: low-bit communication for tensor-parallel inference")
st.markdown(
    "**What you will learn:** where a tensor-parallel (TP) model talks between its GPUs, how many bytes that is "
    "for every token, and what happens to the model's answers when those messages shrink from 16 bits to about "
    "4 bits per value. Then run it for real: the demo below starts a multi-process TP job on this machine.")

names = _ui.model_names()
left, right = st.columns(2)
with left:
    model = st.selectbox("Model", names, index=names.index("smollm2-135m") if "smollm2-135m" in names else 0,
                         key="ov_model", help="smollm2-135m is the embedded real model; tiny-* are random "
                                              "test models that run in seconds.")
sizes = _ui.valid_tp_sizes(model)
with right:
    tp = st.selectbox("TP size (ranks)", sizes, index=sizes.index(3) if 3 in sizes else min(1, len(sizes) - 1),
                      key="ov_tp", help="Only sizes that divide the model's attention heads are offered.")
shape = _ui.model_shape(model)
H, L = shape["hidden"], shape["layers"]


# -- 1. where TP communicates ----------------------------------------------------------------------
def layer_diagram(tp: int, hidden: int) -> str:
    """DOT source of one decoder layer sharded over ``tp`` ranks (at most 4 drawn)."""
    shown = list(range(min(tp, 4)))
    lines = ['digraph G {', 'rankdir=LR; bgcolor="white"; nodesep=0.25; ranksep=0.45;',
             'node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=18, fillcolor="#E8F1FA", '
             'color="#0072B2", penwidth=1.5];', 'edge [color="#333333", penwidth=1.4];',
             f'x [label="hidden state\\n{hidden} features\\n(all ranks)", fillcolor="#FFFFFF", color="#111111"];',
             'ar1 [label="ALL-REDUCE 1\\nsum of partials\\n16 bits/value", shape=box, fillcolor="#D55E00", '
             'fontcolor="white", color="#D55E00"];',
             'ar2 [label="ALL-REDUCE 2\\nsum of partials\\n16 bits/value", shape=box, fillcolor="#D55E00", '
             'fontcolor="white", color="#D55E00"];',
             'h [label="hidden state\\n+ residual", fillcolor="#FFFFFF", color="#111111"];',
             'out [label="next layer", fillcolor="#FFFFFF", color="#111111"];']
    for r in shown:
        lines += [f'a{r} [label="rank {r}: q k v (its heads)\\n-> attention\\n-> o_proj (its rows)\\n= partial sum"];',
                  f'm{r} [label="rank {r}: gate/up (its columns)\\n-> down_proj (its rows)\\n= partial sum", '
                  'fillcolor="#E6F5EF", color="#009E73"];',
                  f'x -> a{r}; a{r} -> ar1; h -> m{r}; m{r} -> ar2;']
    if tp > len(shown):
        lines += [f'amore [label="... {tp - len(shown)} more rank(s)", shape=plaintext, style=""];',
                  f'mmore [label="... {tp - len(shown)} more rank(s)", shape=plaintext, style=""];',
                  'x -> amore [style=dashed]; amore -> ar1 [style=dashed]; h -> mmore [style=dashed]; '
                  'mmore -> ar2 [style=dashed];']
    lines += ['ar1 -> h; ar2 -> out;', '}']
    return "\n".join(lines)


st.header("1. Where tensor parallelism communicates")
st.markdown(
    f"Each of the {tp} rank(s) holds a slice of every weight matrix. The **column-parallel** layers (q, k, v, "
    "gate, up) need no communication. The **row-parallel** layers (`o_proj` after attention, `down_proj` after the "
    "MLP) each leave every rank with a *partial sum* of the full hidden vector, and the ranks add those partials "
    "with an **all-reduce** -- twice per decoder layer, for every token.")
st.graphviz_chart(layer_diagram(tp, H), width="stretch")

# -- 2. bytes --------------------------------------------------------------------------------------
st.header("2. How many bytes per token")
schemes = ["bf16", "int8-token", "int4-static-top1/64"]
traffic = []
for s in schemes:
    try:
        t = results.traffic_per_token(s, H, L, tp)
    except ValueError as exc:  # a scheme this model's hidden size cannot take
        st.caption(f"{s}: {exc}")
        continue
    traffic.append(t)
table = pd.DataFrame(traffic)
bf16 = table.iloc[0]
c1, c2, c3 = st.columns(3)
c1.metric("Values per token per layer", f"2 x {H:,}", help="two all-reduces, each of the full hidden vector")
c2.metric("Message per token per layer (BF16)", f"{bf16['message_bytes_per_layer']:,.0f} B")
c3.metric(f"Per token, all {L} layers (BF16)", f"{bf16['message_bytes'] / 1024:,.1f} KiB")
show = pd.DataFrame({
    "scheme": table["scheme"],
    "bits / value": table["bits_per_value"].round(4),
    "message bytes / token / layer": table["message_bytes_per_layer"].round(1),
    f"bytes each rank sends / token / layer (TP {tp})": table["sent_bytes_per_layer"].round(1),
    f"KiB / token, all {L} layers": (table["message_bytes"] / 1024).round(2),
    "vs BF16": (table["message_bytes"] / bf16["message_bytes"]).map(lambda r: f"{r:.2f}x"),
})
st.dataframe(show, hide_index=True, width="stretch")
st.caption(f"{model}: hidden size {H}, {L} layers. Message = one rank's encoded partial sum. BF16 is sent with a "
           "ring all-reduce (2(TP-1)/TP of the message per rank); the quantized schemes all-gather their payload "
           "(TP-1 copies per rank). The Bits page breaks the bits down by payload, outliers and scales.")

# -- 3. the idea -----------------------------------------------------------------------------------
st.header("3. The paper's idea")
st.markdown(
    "Dong et al. (*Towards Low-bit Communication for Tensor Parallel LLM Inference*, 2024) observe that a few "
    "hidden **features** of these partial sums have far larger ranges than the rest, and that they are the "
    "**same features** for every input. So they:\n"
    "1. **calibrate**: keep a moving average of each feature's min and max on some text;\n"
    "2. **select** the top 1/64 of features by range and send those in BF16, the same ones on every rank;\n"
    "3. **quantize** every other feature to Int4 with a fixed per-feature scale, then dequantize and sum.\n\n"
    "That is 63/64 x 4 + 1/64 x 16 = **4.1875 bits per value** instead of 16. The paper keeps about 98-99.5 % of "
    "the original task accuracy on 13B-27B models. The demo below checks what happens on a small model.")

# -- 4. the demo -----------------------------------------------------------------------------------
st.header("4. Run the demo")
st.markdown(
    f"One job on this machine: **{model}** split over **{tp}** process(es) talking through real collectives. It "
    "calibrates on Wikipedia-style text, then evaluates four ways to communicate: the exact BF16 all-reduce, "
    "Int4 for every feature, Int4 with 1/64 *random* features kept in BF16, and Int4 with the *top* 1/64 "
    "features in BF16 (the paper). Everything is compared with an exact FP32 run on the same tokens.")


def demo_runs(frame: pd.DataFrame) -> pd.DataFrame:
    """Evaluate runs with exactly the demo's schemes, newest first."""
    demo = frame[(frame["kind"] == "evaluate") & (frame["schemes"] == ", ".join(DEMO_SCHEMES))]
    return demo.reset_index(drop=True)


@st.fragment(run_every=_ui.POLL_S)
def demo_progress(run_id: str) -> None:
    status = _ui.show_progress(run_id)
    if status not in ACTIVE:
        st.rerun()  # the whole page redraws once, now with the result


def demo_result(run_id: str, row) -> None:
    data, problem = _ui.result(run_id)
    if problem:
        st.error(f"Run {run_id} finished but its result cannot be read: {problem}")
        return
    frame = results.scheme_frame(data)
    if frame.empty:
        st.warning(f"Run {run_id} has no scheme records in its result.json.")
        return
    took = row["duration_s"] if row is not None and pd.notna(row["duration_s"]) else None
    st.success(f"Demo run {run_id} ({data.get('model')}, TP {data.get('tp')}, backend {data.get('backend')})"
               + (f" finished in {took:.0f} s." if took else "."))
    shown = frame[~frame["reference"]]
    colors = _ui.scheme_colors(shown["scheme"])
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                        subplot_titles=("Top-1 agreement with exact FP32 (%)", "KL divergence from exact (nats/token)"))
    fig.add_trace(go.Bar(x=shown["scheme"], y=shown["top1_agreement"] * 100, marker_color=list(colors.values()),
                         text=(shown["top1_agreement"] * 100).round(1), textposition="outside", showlegend=False),
                  row=1, col=1)
    fig.add_trace(go.Bar(x=shown["scheme"], y=shown["kl"], marker_color=list(colors.values()),
                         text=shown["kl"].map(lambda v: f"{v:.3g}"), textposition="outside", showlegend=False),
                  row=1, col=2)
    fig.update_yaxes(title_text="agreement (%)", range=[0, 110], row=1, col=1)
    fig.update_yaxes(title_text="KL (nats/token, log scale)", type="log", row=1, col=2)
    fig.update_xaxes(title_text="scheme")
    _ui.style(fig, height=520)
    fig.update_annotations(font_size=_ui.FONT + 2)
    _ui.plot(fig, key="demo_chart")
    table = pd.DataFrame({
        "scheme": frame["scheme"], "bits / value": frame["bits_per_value"].round(4),
        "perplexity": frame["ppl"].round(2), "KL (nats/token)": frame["kl"].map(lambda v: f"{v:.4g}"),
        "top-1 agreement (%)": (frame["top1_agreement"] * 100).round(1),
        "task accuracy kept (%)": frame["kept_pct"].round(1), "± (s.e.)": frame["kept_se"].round(1),
    })
    st.dataframe(table, hide_index=True, width="stretch")
    st.caption("Top-1 agreement: how often the next-token choice equals the exact run's. KL: how far the whole "
               "next-token distribution moved. % kept: task accuracy relative to exact (the paper's measure).")
    st.page_link("pages/tradeoffs.py", label="Compare with more schemes (Trade-offs)", icon=":material/balance:")


frame = _ui.runs()
demo_id = st.session_state.get("demo_run")
if demo_id is not None and demo_id not in set(frame["id"]):
    demo_id = None  # a different runs root, or a deleted run
b1, b2 = st.columns([1, 3])
with b1:
    clicked = st.button("Run the demo", type="primary", icon=":material/play_arrow:", key="demo_button")
with b2:
    st.caption(f"Sizes are chosen to finish within about 3 minutes on a 2-core CPU. {DEMO_LONGER}")
if clicked:
    new_id = _ui.submit(demo_spec(model=model, tp=tp), state_key="demo_run")
    if new_id:
        demo_id = new_id
        frame = _ui.runs()

if demo_id is None:
    previous = demo_runs(frame)
    done = previous[previous["status"] == "done"]
    if not done.empty:
        demo_id = done.iloc[0]["id"]
        st.caption(f"Showing the latest finished demo ({demo_id}); press the button for a new one.")
if demo_id is not None:
    rows = frame[frame["id"] == demo_id]
    row = rows.iloc[0] if not rows.empty else None
    status = row["status"] if row is not None else "unknown"
    if status in ACTIVE:
        demo_progress(demo_id)
        if st.button("Cancel the demo", icon=":material/stop:", key="demo_cancel"):
            _ui.cancel_run(demo_id)
            st.rerun()
    elif status in ("done", "unindexed"):
        demo_result(demo_id, row)
    else:
        st.error(f"The demo run {demo_id} ended **{status}**. Nothing else is affected; press the button to try "
                 "again, or open Runs for its logs.")
        if row is not None and isinstance(row["error"], str) and row["error"]:
            st.code(row["error"][-3000:], language=None)
        elif row is not None and isinstance(row["problem"], str):
            st.code(row["problem"], language=None)

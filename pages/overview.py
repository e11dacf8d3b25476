"""Overview: what tensor parallelism communicates, where, how many bytes, and the paper's idea;
one button runs the classroom demo (launch.presets.demo_spec) and shows its result."""
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from launch.index import ACTIVE
from launch.presets import DEMO_LONGER, DEMO_SCHEMES, demo_spec, demo_tp
from launch.store.evaluate import scheme_frame
from lowbit import stats
from pages import _access, _ui

st.title("lowbit: low-bit communication for tensor-parallel inference")
st.markdown(
    "**What you will learn:** where a tensor-parallel (TP) model talks between its GPUs, how many bytes that is "
    "for every token, and what happens to the model's answers when those messages shrink from 16 bits to about "
    "4 bits per value. Then run it for real: the demo below starts a multi-process TP job on this machine.")

names = _ui.model_names()
left, right = st.columns(2)
with left:
    model = st.selectbox("Model", names, index=names.index("smollm2-135m") if "smollm2-135m" in names else 0,
                         key="ov_model", help="smollm2-135m and gemma3-270m are the embedded real models "
                                              "(Gemma 3: 4 query heads, 1 KV head, so TP 1, 2 or 4 with the KV "
                                              "head replicated); tiny-* are random test models that run in seconds.")
sizes = _ui.valid_tp_sizes(model)
with right:
    default_tp = demo_tp(model, sizes)
    tp = st.selectbox("TP size (ranks)", sizes, index=sizes.index(default_tp) if default_tp in sizes else 0,
                      key="ov_tp", help="Only sizes that divide the model's attention heads are offered "
                                        "(and, past the KV heads, replicate them).")
shape = _ui.model_shape(model)
H, L = shape["hidden"], shape["layers"]


# -- 1. where TP communicates ----------------------------------------------------------------------
def layer_diagram(tp: int, hidden: int) -> go.Figure:
    """One decoder layer sharded over ``tp`` ranks (at most 4 drawn), as boxes and arrows."""
    shown = min(tp, 4)
    ys = [(shown - 1) / 2 - r for r in range(shown)]
    fig = go.Figure()

    def box(x, y, text, fill, line, w=0.8, h=0.8, color="#111"):
        fig.add_shape(type="rect", x0=x - w / 2, x1=x + w / 2, y0=y - h / 2, y1=y + h / 2, fillcolor=fill,
                      line=dict(color=line, width=3), layer="below")
        fig.add_annotation(x=x, y=y, text=text, showarrow=False, font=dict(size=_ui.FONT + 2, color=color))

    def arrow(x0, y0, x1, y1):
        fig.add_annotation(x=x1, y=y1, ax=x0, ay=y0, xref="x", yref="y", axref="x", ayref="y", text="",
                           showarrow=True, arrowhead=2, arrowsize=1.2, arrowwidth=2.5, arrowcolor="#333")

    X, A, R1, P, M, R2, N = 0.0, 1.5, 3.0, 4.1, 5.3, 6.8, 8.0  # column centres
    box(X, 0, f"<b>x</b><br>{hidden}<br>features", "white", "#111")
    box(P, 0, "<b>+ x</b>", "white", "#111", w=0.5, h=0.5)
    box(N, 0, "next<br>layer", "white", "#111")
    for x in (R1, R2):
        box(x, 0, "<b>ALL-<br>REDUCE</b><br>16 bit", "#D55E00", "#D55E00", color="white")
    for r, y in enumerate(ys):
        box(A, y, f"<b>rank {r}</b><br>attention<br>+ o_proj", "#E8F1FA", "#0072B2", w=1.05)
        box(M, y, f"<b>rank {r}</b><br>MLP<br>+ down_proj", "#E6F5EF", "#009E73", w=1.05)
        arrow(X + 0.4, 0, A - 0.53, y)
        arrow(A + 0.53, y, R1 - 0.4, 0)
        arrow(P + 0.25, 0, M - 0.53, y)
        arrow(M + 0.53, y, R2 - 0.4, 0)
    arrow(R1 + 0.4, 0, P - 0.25, 0)
    arrow(R2 + 0.4, 0, N - 0.4, 0)
    for x in ((A + R1) / 2, (M + R2) / 2):
        fig.add_annotation(x=x, y=ys[0] + 0.5, text="partial sums", showarrow=False,
                           font=dict(size=_ui.FONT - 2, color="#555"))
    if tp > shown:
        for x in (A, M):
            fig.add_annotation(x=x, y=ys[-1] - 0.65, text=f"+ {tp - shown} more rank(s)", showarrow=False,
                               font=dict(size=_ui.FONT))
    low = ys[-1] - (0.9 if tp > shown else 0.6)
    fig.update_xaxes(visible=False, range=[-0.5, 8.5])
    fig.update_yaxes(visible=False, range=[low, ys[0] + 0.7])
    fig.update_layout(template="plotly_white", height=max(300, 120 * shown + 120), margin=dict(l=10, r=10, t=10, b=10),
                      showlegend=False, dragmode=False)
    return fig


st.header("1. Where tensor parallelism communicates")
st.markdown(
    f"Each of the {tp} rank(s) holds a slice of every weight matrix. The **column-parallel** layers (q, k, v, "
    "gate, up) need no communication. The **row-parallel** layers (`o_proj` after attention, `down_proj` after the "
    "MLP) each leave every rank with a *partial sum* of the full hidden vector, and the ranks add those partials "
    "with an **all-reduce** -- twice per decoder layer, for every token.")
_ui.plot(layer_diagram(tp, H), key="ov_diagram")

# -- 2. bytes --------------------------------------------------------------------------------------
st.header("2. How many bytes per token")
schemes = ["bf16", "int8-token", "int4-static-top1/64"]
traffic = []
for s in schemes:
    try:
        t = _ui.traffic_per_token(s, H, L, tp)
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
    frame = scheme_frame(data)
    if frame.empty:
        st.warning(f"Run {run_id} has no scheme records in its result.json.")
        return
    took = row["duration_s"] if row is not None and pd.notna(row["duration_s"]) else None
    st.success(f"Demo run {run_id} ({data.get('model')}, TP {data.get('tp')}, backend {data.get('backend')})"
               + (f" finished in {took:.0f} s." if took and took >= 1 else "."))
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
    fig.update_yaxes(title_text="KL (nats/token, log scale)", type="log", dtick=1, exponentformat="power", row=1, col=2)
    fig.update_xaxes(title_text="scheme")
    _ui.style(fig, height=520)
    fig.update_annotations(font_size=_ui.FONT + 2)
    _ui.plot(fig, key="demo_chart")
    # Display strings: a value the run did not measure (no tasks in the demo: % kept) stays blank.
    table = pd.DataFrame({
        "scheme": frame["scheme"], "bits / value": [stats.fmt_num(v, ".4g") for v in frame["bits_per_value"]],
        "perplexity": [stats.fmt_num(v, ".2f") for v in frame["ppl"]],
        "KL (nats/token)": [stats.fmt_num(v, ".4g") for v in frame["kl"]],
        "top-1 agreement (%)": [stats.fmt_pm(v, None, 100.0) for v in frame["top1_agreement"]],
        "task accuracy kept (%) ± s.e.": [
            stats.fmt_pm(k, None if ref else se) + (" !" if not ref and stats.kept_is_unresolved(k, se) else "")
            for k, se, ref in zip(frame["kept_pct"], frame["kept_se"], frame["reference"])],
    })
    st.dataframe(table, hide_index=True, width="stretch")
    st.caption("Top-1 agreement: how often the next-token choice equals the exact run's. KL: how far the whole "
               "next-token distribution moved. % kept: task accuracy relative to exact (the paper's measure), "
               "± one standard error of the paired differences; ! marks an error larger than the gap it claims.")
    _ui.random_weights_note([data.get("model")])
    st.page_link("pages/tradeoffs.py", label="Compare with more schemes (Trade-offs)", icon=":material/balance:")


frame = _ui.runs()
demo_id = st.session_state.get("demo_run")
if demo_id is not None and demo_id not in set(frame["id"]):
    demo_id = None  # a different runs root, or a deleted run
running_demos = demo_runs(frame[frame["status"].isin(ACTIVE)])
if not running_demos.empty:
    demo_id = running_demos.iloc[0]["id"]  # one demo at a time: follow the one that runs, whoever started it
b1, b2 = st.columns([1, 3])
with b1:
    refusal = _ui.start_refusal() or (f"A demo is already queued or running ({demo_id}): its progress is below."
                                      if not running_demos.empty else None)
    clicked = _ui.job_button("Run the demo", key="demo_button", refusal=refusal, type="primary",
                             icon=":material/play_arrow:")
with b2:
    st.caption(f"Sizes are chosen to finish within about 3 minutes on a 2-core CPU. {DEMO_LONGER}")
if clicked and running_demos.empty:
    new_id = _ui.submit(demo_spec(model=model, tp=tp), state_key="demo_run")
    if new_id:
        demo_id = new_id
        frame = _ui.runs()
elif clicked:
    st.error(refusal, icon=":material/block:")  # a click the disabled button cannot send: refused here too

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
        if _ui.job_button("Cancel the demo", key="demo_cancel", refusal=_access.cancel_refusal(demo_id),
                          icon=":material/stop:"):
            if _ui.cancel_run(demo_id) is not None:
                st.rerun()
    elif status in ("done", "unindexed"):
        demo_result(demo_id, row)
    elif status == "cancelled":
        st.info(f"The demo run {demo_id} was cancelled{_ui.cancel_note(row)}. Press the button to start it again.",
                icon=":material/stop_circle:")
    else:
        st.error(f"The demo run {demo_id} ended **{status}**. Nothing else is affected; press the button to try "
                 "again, or open Runs for its logs.")
        if row is not None and isinstance(row["error"], str) and row["error"]:
            st.code(row["error"][-3000:], language=None)
        elif row is not None and isinstance(row["problem"], str):
            st.code(row["problem"], language=None)

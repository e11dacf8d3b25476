"""Collectives: how long do exact and quantized all-reduces take, by message size and TP size?

Reads the records of ``collective-bench`` runs (tp, tokens, hidden, method, scheme, median_ms,
speedup_vs_bf16, bytes_per_rank, bits_per_value, link)."""
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from launch.kinds.collective_bench import job_spec
from launch.registry import KINDS
from launch.store.bench import collective_frame, crossover_table
from pages import _ui

st.title("Collectives: time on the wire")
st.markdown(
    "**What you will learn:** whether fewer bits actually make the all-reduce faster. Quantizing costs compute "
    "(encode, decode) and the all-gather moves TP-1 payloads per rank, so the gain depends on the message size, "
    "the TP size and the link: large messages over slow links win, tiny messages lose to fixed latency.")

frame = _ui.runs()
bench = collective_frame(frame, _ui.root())


def bench_form(key: str) -> None:
    c1, c2 = st.columns(2)
    with c1:
        tp = st.selectbox("TP size", [2, 3, 4, 8], index=1, key=f"{key}_tp")
    with c2:
        link = st.selectbox("Link", ["loopback", "1gbit", "100mbit"], key=f"{key}_link",
                            help="Rate-limited links emulate separate nodes (network namespaces + tc)")
    if _ui.job_button("Run the collective benchmark", key=f"{key}_go", refusal=_ui.start_refusal(),
                      icon=":material/play_arrow:"):
        if "collective-bench" in KINDS:
            # A classroom-sized grid: decode, a short and a long prompt at the embedded model's width
            # (the full default grid can take most of an hour over a 100 Mbit/s link).
            _ui.submit(job_spec(int(tp), link, {"tokens": [1, 256, 2048], "hidden": [576]}))
        else:
            _ui.submit(dict(kind="collective-bench", tp=int(tp), link=link))


if bench.empty:
    ready = "collective-bench" in KINDS
    _ui.empty_state(
        "No collective benchmark results yet.",
        "The `collective-bench` job times the exact BF16 all-reduce against the quantized all-gather and two-shot "
        "collectives for a range of message sizes (tokens x hidden) at a TP size, on loopback or on a "
        "rate-limited link, and writes one record per configuration: median time, speedup vs BF16 and bytes "
        "per rank. "
        + ("Start one below (rate-limited links need root for network namespaces). From a terminal: "
           "`.venv/bin/python -m bench.collectives --tp 3 --link loopback 1gbit`." if ready else
           "This job kind is still being built; once it is registered the button below starts it (until then it "
           "shows why it cannot run)."))
    bench_form("cb_empty")
    st.stop()

c1, c2, c3 = st.columns(3)
with c1:
    tps = sorted(bench["tp"].dropna().astype(int).unique())
    tp_pick = _ui.filter_all("TP sizes", tps, key="cb_tp")
with c2:
    links = sorted(bench["link"].dropna().astype(str).unique())
    link_pick = st.selectbox("Link", links, key="cb_link") if links else None
with c3:
    bench["label"] = bench["method"].astype(str) + " · " + bench["scheme"].astype(str)
    labels = sorted(bench["label"].unique())
    label_pick = _ui.filter_all("Method · scheme", labels, key="cb_labels")
shown = bench[bench["tp"].isin(tp_pick) & bench["label"].isin(label_pick)]
if link_pick is not None:
    shown = shown[shown["link"].astype(str) == link_pick]
if shown.empty:
    st.warning("Nothing matches these filters.")
    st.stop()
shown = shown.sort_values("message_mib")
colors = _ui.scheme_colors(labels)


def decades(fig):
    """Log axes labelled once per decade; facet titles without the column name."""
    fig.update_xaxes(dtick=1, exponentformat="power")
    fig.for_each_annotation(lambda a: a.update(font_size=_ui.FONT + 2))
    return fig


sizes = shown["message_mib"].nunique()
if sizes == 1:
    st.info(f"These records hold one message size ({shown['message_mib'].iloc[0]:.3g} MiB in BF16), so each chart "
            "shows one bar per method instead of a curve over sizes. Run the benchmark over more sizes (below) to see "
            "where each scheme starts to pay.", icon=":material/info:")


def chart(y: str, axis: str, title: str, log_y: bool) -> go.Figure:
    """``y`` by message size, one line per method and scheme, a facet per TP size; one bar per
    method when only one message size is stored (a line of one point is a lone dot)."""
    labels = dict(message_mib="message (MiB in BF16)", label="", tp="TP", **{y: axis})
    if sizes == 1:
        fig = px.bar(shown, x="label", y=y, color="label", facet_col="tp", log_y=log_y, color_discrete_map=colors,
                     labels=labels)
        fig.update_layout(showlegend=False)
        fig.for_each_annotation(lambda a: a.update(font_size=_ui.FONT + 2))
    else:
        fig = decades(px.line(shown, x="message_mib", y=y, color="label", facet_col="tp", markers=True, log_x=True,
                              log_y=log_y, color_discrete_map=colors, labels=labels))
    if log_y:
        fig.update_yaxes(**_ui.log_ticks(shown[y]))
    fig.update_layout(title=title)
    return fig


fig = chart("median_ms", "median time (ms, log scale)",
            f"All-reduce time by message size ({link_pick or 'any link'}); message = tokens x hidden x 2 B",
            log_y=True)
_ui.plot(_ui.style(fig, height=520), key="cb_time")

fig = chart("speedup_vs_bf16", "speedup vs BF16 all-reduce (x)",
            "Speedup: above the dashed line the quantized collective wins", log_y=False)
_ui.reference_line(fig, 1.0, "as fast as BF16", dash="dash", color="#111")
_ui.plot(_ui.style(fig, height=480), key="cb_speedup")

st.markdown("**Where each scheme starts to pay** (from these measured records): the smallest message from which "
            "the quantized collective is at least as fast as the BF16 all-reduce at every larger measured size. "
            "A scheme ending in `@minauto` sends smaller messages as exact BF16, at this threshold.")
pays = crossover_table(shown)
st.dataframe(pays.drop(columns=["pays_from_bytes"]), hide_index=True, width="stretch",
             column_config={"pays_from_mib": st.column_config.NumberColumn("pays from (MiB)", format="%.3g"),
                            "best_speedup": st.column_config.NumberColumn("best speedup (x)", format="%.2f")})
st.caption("What you see: an empty 'pays from' means the quantized collective never won at the largest measured "
           "size on this link (the codec's cost is larger than the bytes it saves).")

fig = chart("bytes_per_rank", "bytes sent per rank (log scale)", "Bytes each rank moves", log_y=True)
_ui.plot(_ui.style(fig, height=480), key="cb_bytes")

st.dataframe(shown.drop(columns=["label"]), hide_index=True, width="stretch")
with st.expander("Run the benchmark again"):
    bench_form("cb_more")

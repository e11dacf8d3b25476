"""Collectives: how long do exact and quantized all-reduces take, by message size and TP size?

Reads the records of ``collective-bench`` runs (tp, tokens, hidden, method, scheme, median_ms,
speedup_vs_bf16, bytes_per_rank, bits_per_value, link)."""
import plotly.express as px
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
    if st.button("Run the collective benchmark", icon=":material/play_arrow:", key=f"{key}_go"):
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
common = dict(color="label", facet_col="tp", markers=True, log_x=True, color_discrete_map=colors)

fig = px.line(shown, x="message_mib", y="median_ms", log_y=True, **common,
              labels=dict(message_mib="message (MiB in BF16)", median_ms="median time (ms, log scale)", label="",
                          tp="TP"))
fig.update_layout(title=f"All-reduce time by message size ({link_pick or 'any link'}); message = tokens x hidden x 2 B")
fig.update_yaxes(dtick=1, exponentformat="power")
decades(fig)
_ui.plot(_ui.style(fig, height=520), key="cb_time")

fig = px.line(shown, x="message_mib", y="speedup_vs_bf16", **common,
              labels=dict(message_mib="message (MiB in BF16)", speedup_vs_bf16="speedup vs BF16 all-reduce (x)",
                          label="", tp="TP"))
fig.add_hline(y=1.0, line=dict(dash="dash", color="#111"), annotation_text="as fast as BF16")
fig.update_layout(title="Speedup: above the dashed line the quantized collective wins")
decades(fig)
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

fig = px.line(shown, x="message_mib", y="bytes_per_rank", log_y=True, **common,
              labels=dict(message_mib="message (MiB in BF16)", bytes_per_rank="bytes sent per rank (log scale)",
                          label="", tp="TP"))
fig.update_layout(title="Bytes each rank moves")
fig.update_yaxes(dtick=1, exponentformat="power")
decades(fig)
_ui.plot(_ui.style(fig, height=480), key="cb_bytes")

st.dataframe(shown.drop(columns=["label"]), hide_index=True, width="stretch")
with st.expander("Run the benchmark again"):
    bench_form("cb_more")

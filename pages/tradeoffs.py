"""Trade-offs: accuracy kept vs bits per value vs measured communication time, one point per
scheme, with the Pareto frontier; the table below downloads as CSV."""
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from launch import results
from pages import _ui

QUALITY = {  # label -> (column, standard-error column, higher is better, axis title)
    "task accuracy kept (%)": ("kept_pct", "kept_se", True, "task accuracy kept vs exact (%)"),
    "mean task accuracy": ("avg_primary", "avg_primary_se", True, "mean task accuracy (primary metric)"),
    "top-1 agreement (%)": ("top1_pct", None, True, "top-1 agreement with exact (%)"),
    "KL divergence": ("kl", None, False, "KL from exact (nats/token, log scale)"),
    "perplexity": ("ppl", None, False, "perplexity"),
}
COST = {
    "bits per value": ("bits_per_value", "bits per value sent"),
    "measured communication time": ("comm_ms_per_ktok", "communication time (ms per 1k tokens, measured)"),
}

st.title("Trade-offs: accuracy vs bits vs time")
st.markdown(
    "**What you will learn:** which schemes are worth it. Each point is one scheme of an evaluate run; the "
    "**Pareto frontier** (thick line) links the schemes that no other scheme beats on both axes at once. Error bars "
    "are one standard error from the task items (paired with the exact run for % kept).")

run_ids = _ui.pick_evaluate_run(label="Evaluation runs", key="to_runs", multi=True)
if not run_ids:
    if results.evaluate_runs(_ui.runs(), _ui.root()).empty:
        _ui.empty_state("No evaluation results yet.",
                        "An evaluate run measures every scheme's accuracy, bits and communication time. The "
                        "classroom demo is one; the Runs page starts any other.")
    else:
        st.info("Pick at least one evaluation run above.")
    st.stop()

frames = []
for run_id in run_ids:
    data, problem = _ui.result(run_id)
    if problem:
        st.warning(f"{run_id}: {problem}")
        continue
    f = results.scheme_frame(data)
    f.insert(0, "run", run_id)
    f.insert(1, "model", data.get("model"))
    f.insert(2, "tp", data.get("tp"))
    frames.append(f)
if not frames:
    st.error("None of the chosen runs has a readable result.")
    st.stop()
table = pd.concat(frames, ignore_index=True)
table["top1_pct"] = table["top1_agreement"] * 100

c1, c2, c3 = st.columns(3)
with c1:
    # Default to the first measure these runs have: the demo evaluates no tasks, so "% kept" would be empty.
    present = [q for q, (col, *_) in QUALITY.items() if table[col].notna().any()] or list(QUALITY)
    quality = st.selectbox("Quality (y)", list(QUALITY), index=list(QUALITY).index(present[0]), key="to_quality")
with c2:
    cost = st.radio("Cost (x)", list(COST), horizontal=True, key="to_cost")
with c3:
    show_ref = st.toggle("Show the FP32 reference", value=False, key="to_ref")
y, y_se, higher, y_title = QUALITY[quality]
x, x_title = COST[cost]
points = table if show_ref else table[~table["reference"]]
points = points.dropna(subset=[x, y]).reset_index(drop=True)
if points.empty:
    st.warning(f"No scheme has both {cost} and {quality}; task metrics need a run with tasks.")
else:
    front = results.pareto_front(points[x], points[y] if higher else -points[y])
    fig = go.Figure()
    multi = len(run_ids) > 1
    colors = _ui.scheme_colors(points["scheme"])
    symbols = ["circle", "square", "diamond", "triangle-up", "x", "star"]
    runs_in_plot = list(dict.fromkeys(points["run"]))
    for (run_id, scheme), g in points.groupby(["run", "scheme"], sort=False):
        color = colors[scheme]
        err = None
        if y_se and g[y_se].notna().any():
            err = dict(type="data", array=g[y_se].fillna(0), thickness=2, width=8, color=color)
        name = scheme + (f" ({run_id})" if multi else "")
        fig.add_trace(go.Scatter(x=g[x], y=g[y], error_y=err, mode="markers", name=name,
                                 marker=dict(size=16, color=color, line=dict(color="white", width=1),
                                             symbol=symbols[runs_in_plot.index(run_id) % len(symbols)]),
                                 hovertemplate=f"{scheme}<br>{x_title}: %{{x:.4g}}<br>{y_title}: %{{y:.4g}}"))
    fp = points[front].sort_values(x)
    fig.add_trace(go.Scatter(x=fp[x], y=fp[y], mode="lines+markers", name="Pareto frontier",
                             line=dict(color="#111", width=3, dash="dot"),
                             marker=dict(size=26, symbol="circle-open", color="#111", line=dict(width=2))))
    fig.update_layout(title=f"{quality} vs {cost} ({'up' if higher else 'down'} and left is better)",
                      xaxis_title=x_title, yaxis_title=y_title)
    if y == "kl":
        fig.update_yaxes(type="log")
    _ui.plot(_ui.style(fig, height=600), key="to_chart")
    st.caption("On the frontier: " + ", ".join(fp["scheme"]) + ".")

st.subheader("All schemes")
columns = ["run", "model", "tp", "scheme", "bits_per_value", "leg1_bits", "leg2_bits", "ppl", "kl", "top1_agreement",
           "kept_pct", "kept_se", "avg_primary", "avg_primary_se", "comm_seconds", "comm_ms_per_ktok", "clamped"]
st.dataframe(table[columns], hide_index=True, width="stretch",
             column_config=dict(kl=st.column_config.NumberColumn("kl", format="%.4g"),
                                ppl=st.column_config.NumberColumn("ppl", format="%.2f")))
_ui.download_csv(table[columns], "lowbit-tradeoffs.csv", key="to_csv")

with st.expander("Per task"):
    tasks = pd.concat([results.task_frame(_ui.result(r)[0]).assign(run=r) for r in run_ids], ignore_index=True)
    if tasks.empty:
        st.caption("These runs evaluated no tasks.")
    else:
        st.dataframe(tasks, hide_index=True, width="stretch")

"""Trade-offs: accuracy kept vs bits per value vs measured communication time, one point per
scheme, with the Pareto frontier; the table below downloads as CSV. Auto-tune sweeps show their
points and their answer per budget, and the form at the bottom starts one."""
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from launch.store.evaluate import (evaluate_runs, pareto_front, scheme_frame, sweep_grid_candidates, sweep_summary,
                                   task_frame)
from lowbit.model.data import TASKS
from lowbit.method.sensitivity import DEFAULT_CANDIDATES
from pages import _controls, _ui

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

BUDGETS = [2.5, 3.0, 3.5, 4.2]
EXTRA_CANDIDATES = ["int3-group64-rot64", "int4-group64-rot64", "int8-token-rot64", "nf3-token-rot64",
                    "nf3-group64-rot64", "nf4-token-rot64"]


def autotune_form() -> None:
    """Controls -> one ``sweep`` job (lowbit.method.sweep): grid, per-layer allocation, budget and floor."""
    st.markdown(
        "The sweep evaluates candidate schemes against exact FP32 on the same tokens and returns the Pareto "
        "frontier of bits vs KL. Candidates come from a **grid** (code x bits x granularity x outliers x rotation x "
        "rounding, kept if their bits fall in the range), from **per-layer bit allocation** (it measures every "
        "layer/module's sensitivity once, then spends the budget where it hurts most), and the paper's scheme. "
        "Finished points are kept: a cancelled sweep resumes where it stopped.")
    c1, c2, c3 = st.columns(3)
    model, tp = _ui.pick_model_tp("at", c1, c2)
    with c3:
        budget = st.slider("Bits per value range", 1.5, 8.5, (2.4, 4.3), step=0.1, key="at_range")
    st.markdown("**Grid**")
    g0, g1, g2, g3, g4, g5 = st.columns(6)
    with g0:
        codes = st.multiselect("Code", _controls.width_families(), default=["int"], key="at_code",
                               help="int: uniform grid; nf: normal-quantile codebook (3 and 4 bits only; it "
                                    "pairs well with rotation)")
    with g1:
        bits = st.multiselect("Bits", [2, 3, 4, 5, 6, 8], default=[3, 4], key="at_bits")
    with g2:
        grans = st.multiselect("Granularity", ["static", "token", "group32", "group64", "group128"],
                               default=["token", "group64"], key="at_gran")
    with g3:
        outliers = st.multiselect("BF16 outliers", ["none", "top1/128", "top1/64", "top1/32"], default=["none"],
                                  key="at_outl")
    with g4:
        rotations = st.multiselect("Rotation block", ["none", 16, 32, 64, 128], default=["none", 64], key="at_rot",
                                   help="Block Walsh-Hadamard before quantizing (dynamic scales only: static "
                                        "combinations are dropped)")
    with g5:
        sr = st.toggle("Also stochastic rounding", value=False, key="at_sr")
    st.markdown("**Per-layer allocation**")
    a1, a2 = st.columns(2)
    with a1:
        allocate = st.multiselect("Allocate bits per layer for budgets", BUDGETS, default=[3.0, 3.5],
                                  key="at_alloc")
    with a2:
        choices = list(dict.fromkeys([*DEFAULT_CANDIDATES, *EXTRA_CANDIDATES]))
        candidates = st.multiselect("Per-site candidates", choices, default=list(DEFAULT_CANDIDATES),
                                    key="at_cands", disabled=not allocate)
    st.markdown("**Accuracy floor and data**")
    problems: list = []
    f1, f2, f3, f4 = st.columns(4)
    with f1:
        kl_max = _ui.number_field("KL at most (0 = no floor)", "at_kl", 0.3, problems, lo=0.0, step=0.05,
                                  field="params.kl_max")
    with f2:
        tasks = st.multiselect("Tasks", TASKS, default=[], key="at_tasks",
                               help="Task accuracy with paired SE; slow on a CPU (seconds per item and scheme: "
                                    "docs/results.md, the accuracy plan)")
    with f3:
        items = _ui.number_field("Items per task", "at_items", 20, problems, lo=1, step=5, disabled=not tasks,
                                 field="items_per_task")
    with f4:
        tokens = _ui.number_field("Evaluation tokens", "at_tokens", 512, problems, lo=256, step=256,
                                  field="eval_tokens")
    grid = dict(code=list(codes) or ["int"], bits=list(bits), granularity=list(grans),
                outliers=[None if o == "none" else o for o in outliers] or [None],
                rotation=[None if r == "none" else int(r) for r in rotations] or [None],
                rounding=["nearest", "stochastic"] if sr else ["nearest"])
    hidden = _ui.model_shape(model)["hidden"]
    in_range = sweep_grid_candidates(grid, hidden, int(tp), *budget) if bits and grans else []
    st.caption(f"{len(in_range)} grid scheme(s) in range" + (f": {', '.join(in_range)}" if in_range else "")
               + (f"; plus {len(allocate)} allocated map(s)" if allocate else "") + "; plus the paper's scheme.")
    if _ui.job_button("Start the auto-tune sweep", key="at_go", refusal=_ui.start_refusal(), type="primary",
                      icon=":material/tune:"):
        params = dict(budget_min=float(budget[0]), budget_max=float(budget[1]), kl_max=float(kl_max) or None,
                      grid=grid if in_range else None, allocate=[float(b) for b in allocate],
                      report_at=[float(b) for b in BUDGETS], seq_len=256, batch_size=2)
        if allocate:
            params["allocate_candidates"] = list(candidates)
        _ui.submit(dict(kind="sweep", model=model, tp=int(tp), calib_tokens=2048, eval_tokens=int(tokens),
                        tasks=list(tasks), items_per_task=int(items) if tasks else 0, params=params),
                   problems=problems)


run_ids = _ui.pick_evaluate_run(label="Evaluation runs and auto-tune sweeps", key="to_runs", multi=True,
                                sweeps=True)
if not run_ids:
    if _ui.evaluate_runs(sweeps=True).empty:
        _ui.empty_state("No evaluation results yet.",
                        "An evaluate run measures every scheme's accuracy, bits and communication time. The "
                        "classroom demo is one; the Runs page starts any other; the form below starts an "
                        "auto-tune sweep.")
    else:
        st.info("Pick at least one evaluation run above.")
    with st.expander("Find the best scheme for a bit budget (auto-tune)"):
        autotune_form()
    st.stop()

frames = []
for run_id in run_ids:
    data, problem = _ui.result(run_id)
    if problem:
        st.warning(f"{run_id}: {problem}")
        continue
    f = scheme_frame(data)
    f.insert(0, "run", run_id)
    f.insert(1, "model", data.get("model"))
    f.insert(2, "tp", data.get("tp"))
    frames.append(f)
_ui.random_weights_note([f["model"].iloc[0] for f in frames if len(f)])
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
    front = pareto_front(points[x], points[y] if higher else -points[y])
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
           "kept_pct", "kept_se", "avg_primary", "avg_primary_se", "comm_seconds", "comm_ms_per_ktok", "clamped",
           "thr_overflow"]
shown = _ui.blank_missing(table[columns], dict(ppl=".2f", kept_pct=".2f", kept_se=".2f", clamped=",.0f",
                                               thr_overflow=",.0f"))
st.dataframe(shown, hide_index=True, width="stretch", column_config=_ui.number_columns(shown, dict(kl="%.4g",
                                                                                                 ppl="%.2f")))
_ui.download_csv(table[columns], "lowbit-tradeoffs.csv", key="to_csv")

for run_id in run_ids:
    answer = sweep_summary(_ui.result(run_id)[0])
    if not answer.empty:
        st.subheader(f"Auto-tune answer: {run_id}")
        st.caption("The lowest-KL scheme at or under each budget (bits per value as sent). "
                   "cheapest_meeting_floor marks the cheapest frontier point that meets the run's accuracy floor.")
        answer = _ui.blank_missing(answer)
        st.dataframe(answer, hide_index=True, width="stretch", column_config=_ui.number_columns(answer, dict(kl="%.4g")))

with st.expander("Per task"):
    tasks = pd.concat([task_frame(_ui.result(r)[0]).assign(run=r) for r in run_ids], ignore_index=True)
    if tasks.empty:
        st.caption("These runs evaluated no tasks.")
    else:
        st.dataframe(tasks, hide_index=True, width="stretch")

with st.expander("Find the best scheme for a bit budget (auto-tune)"):
    autotune_form()

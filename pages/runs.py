"""Runs: the queue with live progress and cancel, a form for any job, the history with filters,
one run's details and logs, and two runs side by side."""
import json

import pandas as pd
import streamlit as st

from launch.index import ACTIVE, STATUSES
from launch.registry import available_kinds
from launch.spec import BACKENDS, SpecError
from launch.store.evaluate import compare_results, compare_specs, scheme_frame
from launch.store.runs import active_runs, codec_changes, events_frame, load_spec, log_tail, run_progress
from lowbit.model.data import TASKS, TEXT_SOURCES
from lowbit.stats import UNRESOLVED_NOTE, score_table
from pages import _access, _ui

st.title("Runs")
st.markdown("Every job is a real `torchrun` launch on this machine; its files live in "
            f"`{_ui.root()}/<run id>/`. The queue runs one job at a time.")


# -- queue ---------------------------------------------------------------------------------------
def queue_panel(active) -> None:
    """Every queued and running job with its progress and a cancel button."""
    if active.empty:
        st.caption("Nothing queued or running.")
        return
    for run in active.itertuples():
        with st.container(border=True):
            c1, c2 = st.columns([5, 1])
            with c1:
                st.markdown(f"**{run.kind}** · {run.model} · TP {run.tp} · `{run.id}`")
                _ui.show_progress(run.id)
            with c2:
                if _ui.job_button("Cancel", key=f"cancel_{run.id}", refusal=_access.cancel_refusal(run.id),
                                  icon=":material/stop:"):
                    status = _ui.cancel_run(run.id)
                    if status is not None:
                        st.toast(f"{run.id}: {status}")
                        st.rerun()


st.header("Queue")
_ui.live_active_runs(queue_panel, every_s=_ui.POLL_S)


# -- new run -------------------------------------------------------------------------------------
def new_run_form() -> None:
    names = _ui.model_names()
    kinds = available_kinds()
    c1, c2, c3, c4 = st.columns(4)
    with c1:
        kind = st.selectbox("Kind", kinds, index=kinds.index("evaluate") if "evaluate" in kinds else 0,
                            key="new_kind")
    with c2:
        model = st.selectbox("Model", names, key="new_model")
    with c3:  # no bounds in the browser: JobSpec names any out-of-range value (tp, tokens, items, limit)
        tp = st.number_input("TP size", value=2, key="new_tp",
                             help=f"valid for {model}: {', '.join(map(str, _ui.valid_tp_sizes(model)))}")
    with c4:
        backend = st.selectbox("Backend", BACKENDS, key="new_backend")
    schemes = st.text_area("Schemes (one per line)", "bf16\nint4-static-top1/64", key="new_schemes",
                           help="python -m lowbit schemes prints the grammar")
    c1, c2, c3, c4 = st.columns(4)
    with c1:
        calib_data = st.selectbox("Calibration text", TEXT_SOURCES, key="new_calib_data")
    with c2:
        calib_tokens = st.number_input("Calibration tokens", value=2048, step=256, key="new_calib_tokens")
    with c3:
        eval_data = st.selectbox("Evaluation text", TEXT_SOURCES, key="new_eval_data")
    with c4:
        eval_tokens = st.number_input("Evaluation tokens", value=1024, step=256, key="new_eval_tokens")
    c1, c2, c3 = st.columns([2, 1, 1])
    with c1:
        tasks = st.multiselect("Tasks", TASKS, default=["arc_easy"], key="new_tasks")
    with c2:
        items = st.number_input("Items per task", value=16, key="new_items")
    with c3:
        limit = st.number_input("Time limit (s)", value=1800.0, step=60.0, key="new_limit")
    params_text = st.text_input("params (JSON object)", '{"seq_len": 128}', key="new_params",
                                help="kind-specific extras, e.g. seq_len, batch_size, layer_error; evaluate: "
                                     "codec (kernels: the kernels inside the communicators; reference)")
    if _ui.job_button("Queue this run", key="new_go", refusal=_ui.start_refusal(), type="primary",
                      icon=":material/play_arrow:"):
        try:
            params = json.loads(params_text or "{}")
        except json.JSONDecodeError as exc:
            _ui.show_problems(SpecError([("params", f"not valid JSON ({exc})")]))
            return
        spec = dict(kind=kind, model=model, tp=int(tp), backend=backend,
                    schemes=[s.strip() for s in schemes.splitlines() if s.strip()], calib_data=calib_data,
                    calib_tokens=int(calib_tokens), eval_data=eval_data, eval_tokens=int(eval_tokens),
                    tasks=list(tasks), items_per_task=int(items), time_limit_s=float(limit), params=params)
        if kind in ("generate", "tp-check"):
            spec["prompt"] = "The partial sums of a tensor-parallel layer"
        _ui.submit(spec)


with st.expander("Start a run", expanded=False):
    new_run_form()

# -- history -------------------------------------------------------------------------------------
st.header("History")
frame = _ui.runs()
if frame.empty:
    st.info("**No runs yet.** Start the classroom demo on the Overview page (one button), or queue any job with "
            "*Start a run* above. From a terminal: `.venv/bin/python -m lowbit evaluate --model tiny-llama --tp 2`.",
            icon=":material/info:")
    st.page_link("pages/overview.py", label="Go to the demo", icon=":material/play_arrow:")
    st.stop()

c1, c2, c3, c4 = st.columns(4)
present = [s for s in (*STATUSES, "corrupt", "unindexed") if s in set(frame["status"])]
with c1:
    statuses = _ui.filter_all("Status", present, key="hist_status")
with c2:
    kind_pick = _ui.filter_all("Kind", sorted(frame["kind"].dropna().astype(str).unique()), key="hist_kind")
with c3:
    model_pick = _ui.filter_all("Model", sorted(frame["model"].dropna().astype(str).unique()), key="hist_model")
with c4:
    search = st.text_input("Search (id, scheme, error)", key="hist_search")
hist = frame[frame["status"].isin(statuses) & frame["kind"].astype(str).isin(kind_pick)
             & frame["model"].astype(str).isin(model_pick)]
if search.strip():
    needle = search.strip().lower()
    text = (hist["id"].astype(str) + " " + hist["schemes"].fillna("") + " " + hist["error"].fillna("")).str.lower()
    hist = hist[text.str.contains(needle, regex=False)]
shown = _ui.blank_missing(hist[["id", "status", "kind", "model", "tp", "schemes", "created", "duration_s", "problem"]],
                          dict(duration_s=".1f", tp=".0f"))
st.dataframe(shown, hide_index=True, width="stretch",
             column_config=dict(_ui.number_columns(shown, dict(duration_s="%.1f")),
                                created=st.column_config.DatetimeColumn("created", format="YYYY-MM-DD HH:mm:ss")))
st.caption(f"{len(hist)} of {len(frame)} runs.")

# -- one run -------------------------------------------------------------------------------------
st.header("Details")
ids = list(hist["id"]) or list(frame["id"])
run_id = st.selectbox("Run", ids, key="detail_run")
row = frame[frame["id"] == run_id].iloc[0]
c1, c2, c3, c4 = st.columns(4)
c1.metric("Status", row["status"])
c2.metric("Kind", str(row["kind"]))
c3.metric("Model · TP", f"{row['model']} · {row['tp']}")
c4.metric("Duration", f"{row['duration_s']:.0f} s" if pd.notna(row["duration_s"]) else "-")
if row["status"] in ACTIVE:
    _ui.show_progress(run_id)
if row["status"] == "cancelled":  # a user's choice: news, not an error
    st.info(f"Cancelled{_ui.cancel_note(row)}.", icon=":material/stop_circle:")
elif isinstance(row["error"], str) and row["error"]:
    st.error("Error reported by the launcher:")
    st.code(row["error"], language=None)
if isinstance(row["problem"], str) and row["problem"]:
    st.warning(f"{row['problem']}")
tab_res, tab_spec, tab_ev, tab_logs = st.tabs(["Result", "Spec", "Progress events", "Logs"])
with tab_res:
    data, problem = _ui.result(run_id)
    if problem:
        st.caption(f"No result: {problem}.")
    elif scheme_frame(data).empty:
        st.json(data, expanded=1)
    else:
        st.dataframe(_ui.blank_missing(scheme_frame(data)), hide_index=True, width="stretch")
        _ui.random_weights_note([data.get("model")])
        scores = score_table(data)
        if not scores.empty:
            st.markdown("**Scores** (± one standard error; Δ: paired difference to the exact run on the same "
                        "items, percentage points)")
            st.dataframe(scores, hide_index=True, width="stretch")
            if any(str(v).endswith(" !") for v in scores.get("kept %", [])):
                st.caption(UNRESOLVED_NOTE)
        st.page_link("pages/tradeoffs.py", label="Plot it (Trade-offs)", icon=":material/balance:")
with tab_spec:
    spec = load_spec(run_id, _ui.root())
    if spec is None:
        st.caption("spec.json is missing or unreadable.")
    else:
        st.code(_ui.spec_json(spec), language="json")
with tab_ev:
    _, _, events = run_progress(run_id, _ui.root())
    for line in codec_changes(events):  # a codec that changed path is never buried in the table
        st.warning(line, icon=":material/swap_horiz:")
    if events:
        st.dataframe(events_frame(events).tail(30), hide_index=True, width="stretch")
    else:
        st.caption("No progress events.")
with tab_logs:
    logs = log_tail(run_id, _ui.root(), lines=60)
    if not logs:
        st.caption("No logs.")
    for name, text in logs.items():
        st.markdown(f"`{name}` (last 60 lines)")
        st.code(text, language=None)

# -- compare -------------------------------------------------------------------------------------
st.header("Compare two runs")
all_ids = list(frame["id"])
if len(all_ids) < 2:
    st.caption("Two runs are needed.")
else:
    c1, c2 = st.columns(2)
    with c1:
        a = st.selectbox("Run A", all_ids, index=0, key="cmp_a")
    with c2:
        b = st.selectbox("Run B", all_ids, index=1, key="cmp_b")
    only_diff = st.toggle("Only fields that differ", value=True, key="cmp_diff")
    specs = compare_specs(load_spec(a, _ui.root()), load_spec(b, _ui.root()))
    st.dataframe(specs[~specs["same"]] if only_diff else specs, hide_index=True, width="stretch")
    st.dataframe(compare_results(_ui.result(a)[0], _ui.result(b)[0]), hide_index=True, width="stretch")

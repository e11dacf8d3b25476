"""lowbit app entry point: `make run` (or `streamlit run app.py`).

Pages live in pages/ and are registered here with st.navigation, grouped as Learn / Explore /
Runs; they read run results (launch.store) and submit jobs (launch.queue), never doing model
math themselves. The sidebar shows the machine, the installed models and the active job.
"""
import streamlit as st

from launch.store.machine import cluster_frame
from launch.store.runs import active_runs
from pages import _teach, _ui

st.set_page_config(page_title="lowbit: low-bit TP communication", layout="wide", page_icon="📡")

pages = {
    "Learn": [st.Page("pages/overview.py", title="Overview", icon=":material/school:", default=True),
              st.Page("pages/lesson.py", title="Lesson", icon=":material/co_present:"),
              st.Page("pages/playground.py", title="Playground", icon=":material/tune:"),
              st.Page("pages/two_shot.py", title="Two-shot", icon=":material/swap_horiz:"),
              st.Page("pages/where_it_pays.py", title="Where it pays", icon=":material/speed:")],
    "Explore": [
        st.Page("pages/outliers.py", title="Outliers", icon=":material/scatter_plot:"),
        st.Page("pages/layer_error.py", title="Layer error", icon=":material/stacked_line_chart:"),
        st.Page("pages/bits.py", title="Bits", icon=":material/stacked_bar_chart:"),
        st.Page("pages/tradeoffs.py", title="Trade-offs", icon=":material/balance:"),
        st.Page("pages/collectives.py", title="Collectives", icon=":material/hub:"),
    ],
    "Runs": [st.Page("pages/runs.py", title="Runs", icon=":material/list:")],
}
page = st.navigation(pages)
_teach.apply_presentation()
_ui.ensure_queue()


@st.fragment(run_every=_ui.POLL_S * 3)
def active_job() -> None:
    active = active_runs(_ui.root())
    if active.empty:
        st.caption("No job running. Start one from Overview (demo) or Runs.")
        return
    run = active.iloc[0]
    st.markdown(f"**{run['kind']}** · {run['model']} · TP {run['tp']}")
    _ui.show_progress(run["id"], show_end=False)
    if len(active) > 1:
        st.caption(f"{len(active) - 1} more queued")
    st.page_link("pages/runs.py", label="Queue and logs", icon=":material/list:")


with st.sidebar:
    st.subheader("Active job")
    active_job()
    st.subheader("Machine")
    info = _ui.machine()
    gpus = f"{info['gpus']} ({', '.join(info['gpu_names'])})" if info["gpu_names"] else str(info["gpus"])
    st.markdown(f"CPU cores: **{info['cpu_cores']}**  \nGPUs: **{gpus}**  \nBackend: **{info['backend']}**")
    if not (cluster := cluster_frame()).empty:  # the Slurm cluster runs go to (executor slurm)
        st.dataframe(cluster, hide_index=True, width="stretch", key="sidebar_cluster")
    st.subheader("Installed models")
    models = _ui.model_sources()
    st.dataframe(models[["name", "kind", "cached"]], hide_index=True, width="stretch")

page.run()

"""lowbit app entry point: `make run` (or `streamlit run app.py`).

Pages live in pages/ and are registered here with st.navigation, grouped as Learn / Explore /
Runs; they read run results (launch.store) and submit jobs (launch.queue), never doing model
math themselves. The sidebar shows the machine, the installed models and the active job (polled
only while one runs). In class mode (pages/_access.py) only the teacher's browser starts jobs.
"""
import streamlit as st

from launch.store.machine import cluster_frame
from pages import _access, _server, _teach, _ui

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
        st.Page("pages/preflight.py", title="Pre-flight", icon=":material/flight_takeoff:"),
    ],
    "Runs": [st.Page("pages/runs.py", title="Runs", icon=":material/list:")],
}
page = st.navigation(pages)
_access.check_teacher_link()
_teach.apply_presentation()
_ui.ensure_queue()
_server.setup_once()


def active_job(active) -> None:
    """The sidebar's job panel: the first queued or running job and its progress."""
    if active.empty:
        st.caption("No job running." + ("" if _ui.start_refusal() else " Start one from Overview (demo) or Runs."))
        return
    run = active.iloc[0]
    st.markdown(f"**{run['kind']}** · {run['model']} · TP {run['tp']}")
    _ui.show_progress(run["id"], show_end=False)
    if len(active) > 1:
        st.caption(f"{len(active) - 1} more queued")
    st.page_link("pages/runs.py", label="Queue and logs", icon=":material/list:")


with st.sidebar:
    st.subheader("Active job")
    _access.sidebar_note()
    _ui.live_active_runs(active_job, every_s=_ui.POLL_S * 3)
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

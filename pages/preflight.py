"""Pre-flight: will this quantized all-reduce break my model, at which sites, and what is the cheapest fix?

Submits ``audit`` jobs (launch.kinds.audit) and shows their reports through launch.store.audit:
a verdict per format against the user's thresholds, the measured fixes, the per-site counters,
and the report as JSON and Markdown downloads (what a user attaches to an engine's issue)."""
import plotly.express as px
import streamlit as st

from launch.store.audit import audit_runs, fix_frame, report_json, report_markdown, site_frame, verdict_frame
from lowbit.method.audit import AUDIT_DEFAULTS, Thresholds, runnable_presets
from lowbit.scheme import PRESETS
from pages import _ui

VERDICT_COLORS = {"safe": "#009E73", "degrades": "#E69F00", "breaks": "#D55E00", "not audited": "#999999"}

st.title("Pre-flight: will this format break my model?")
st.markdown(
    "**What you will learn:** before you turn on an engine's quantized all-reduce, which formats are safe for "
    "*your* model, where they fail, and the cheapest measured fix. Per format and site (layer, module) the audit "
    "counts non-finite outputs, inputs beyond the format's (or its cast's) range, clamped values and "
    "attenuated or underflowed groups, and measures the SQNR of the sum; for the whole model KL, top-1 and "
    "perplexity on held-out text. Each site gets the exact inputs, so a site is flagged for what it does itself.")


# -- a new audit ---------------------------------------------------------------------------------
def audit_form() -> None:
    c1, c2, c3 = st.columns([2, 1, 2])
    model, tp = _ui.pick_model_tp("pf", c1, c2, model="smollm2-135m", tp=3)
    with c3:
        folder = st.text_input("…or a local Hugging Face folder", "", key="pf_folder",
                               help="a directory with config.json, safetensors weights and a tokenizer")
    if folder.strip():  # a local folder's shape is read by the job; the spec check names a preset it refuses
        runnable, left_out = list(PRESETS), {}
    else:
        runnable, left_out = runnable_presets(_ui.model_shape(model)["hidden"], int(tp))
    formats = st.multiselect("Formats", runnable, default=runnable, key=f"pf_formats_{model}_{tp}",
                             help="presets named after shipping systems; the exact BF16 all-reduce is always measured")
    if left_out:
        st.caption("Not offered at this model and TP size: " + "; ".join(
            f"`{name}` ({_ui.clip(why, 160)})" for name, why in left_out.items()))
    extra = st.text_input("More formats (scheme strings, comma-separated)", "", key="pf_extra",
                          help="any scheme, e.g. int8-group32-sfp16 (python -m lowbit schemes)")
    th = Thresholds()
    c1, c2, c3, c4 = st.columns(4)
    with c1:
        breaks_kl = st.number_input("breaks: KL above", min_value=0.0, value=th.breaks_kl, format="%.4g",
                                    key="pf_breaks_kl", help="nats per token")
    with c2:
        degrades_kl = st.number_input("degrades: KL above", min_value=0.0, value=th.degrades_kl, format="%.4g",
                                      key="pf_degrades_kl")
    with c3:
        min_sqnr = st.number_input("degrades: a site's SQNR below (dB)", value=th.min_sqnr_db, key="pf_min_sqnr")
    with c4:
        group_loss = st.number_input("degrades: lost groups above (share)", min_value=0.0, max_value=1.0,
                                     value=th.max_group_loss, format="%.3g", key="pf_group_loss")
    c1, c2, c3 = st.columns(3)
    with c1:
        eval_tokens = st.number_input("Held-out tokens", min_value=0, value=1024, step=256, key="pf_eval_tokens")
    with c2:
        site_tokens = st.number_input("Tokens of the per-site pass", min_value=0, value=512, step=256,
                                      key="pf_site_tokens")
    with c3:
        seq_len = st.number_input("Sequence length", min_value=1, value=AUDIT_DEFAULTS["seq_len"], key="pf_seq_len")
    schemes = [*formats, *(s.strip() for s in extra.split(",") if s.strip())]
    spec = dict(kind="audit", model=folder.strip() or model, tp=int(tp), schemes=schemes, eval_data="wikipedia",
                eval_tokens=int(eval_tokens),
                params=dict(seq_len=int(seq_len), site_tokens=int(site_tokens), breaks_kl=float(breaks_kl),
                            degrades_kl=float(degrades_kl), min_sqnr_db=float(min_sqnr),
                            max_group_loss=float(group_loss)))
    if st.button("Run the audit", type="primary", icon=":material/play_arrow:", key="pf_go"):
        _ui.submit(spec, state_key="pf_run")
    if st.session_state.get("pf_run"):
        _ui.show_progress(st.session_state["pf_run"])


with st.expander("New audit", expanded=True):
    audit_form()


# -- a report ------------------------------------------------------------------------------------
runs = audit_runs(_ui.runs())
if runs.empty:
    _ui.empty_state("No audit yet.", "Start one above, or from a shell: `python -m lowbit audit --model "
                                     "smollm2-135m --tp 3`.")
    st.stop()

labels = dict(zip(runs["id"], runs["label"]))
run_id = st.selectbox("Audit run", list(labels), format_func=labels.get, key="pf_pick")
report, problem = _ui.result(run_id)
if problem or report is None:
    st.error(f"Run {run_id}: {problem or 'no result'}")
    st.stop()

st.header(f"{report['model']} at TP {report['tp']}")
for finding in report.get("model_findings") or []:
    st.error(f"**Model finding ({finding['finding']}):** {finding['message']}", icon=":material/warning:")
if report.get("eval_tokens"):
    st.caption(f"{report['eval_tokens']} held-out tokens of {report['eval_source']} (exact fp32 perplexity "
               f"{report['reference_ppl']:.2f}); {report['site_tokens']} tokens in the per-site pass; messages of "
               f"{report['message_tokens']} tokens; thresholds: " +
               ", ".join(f"{k} {v:g}" for k, v in report["thresholds"].items()))

verdicts = verdict_frame(report)
st.subheader("Verdicts")
st.dataframe(verdicts.drop(columns=["reasons"]), hide_index=True, width="stretch", key="pf_verdicts",
             column_config={"kl": st.column_config.NumberColumn("KL", format="%.3g"),
                            "top1_agreement": st.column_config.NumberColumn("top-1", format="%.3f"),
                            "bits_per_value": st.column_config.NumberColumn("bits/value", format="%.2f"),
                            "fix": st.column_config.TextColumn("cheapest safe fix (measured)")})
for row in verdicts.itertuples():
    if row.verdict != "safe" and row.reasons:
        st.markdown(f"- `{row.format}` **{row.verdict}**: {row.reasons[:400]}")
scored = verdicts.dropna(subset=["kl", "bits_per_value"])
if not scored.empty:
    fig = px.scatter(scored, x="bits_per_value", y="kl", color="verdict", text="format", log_y=True,
                     color_discrete_map=VERDICT_COLORS, labels=dict(bits_per_value="bits per value", kl="KL (nats)"),
                     title="Bits against KL, coloured by verdict")
    fig.update_traces(textposition="top center", marker=dict(size=14))
    _ui.plot(_ui.style(fig, height=420, legend_title="verdict"), key="pf_scatter")

fixes = fix_frame(report)
if not fixes.empty:
    st.subheader("Fixes tried (cheapest first, each measured)")
    st.dataframe(fixes, hide_index=True, width="stretch", key="pf_fixes")

sites = site_frame(report)
st.subheader("Sites")
only_flagged = st.toggle("Only flagged sites", value=True, key="pf_only_flagged")
shown = sites[sites["flagged"] != ""] if only_flagged else sites
if shown.empty:
    st.caption("No site is flagged under any audited format." if only_flagged else "No site rows.")
else:
    st.dataframe(shown, hide_index=True, width="stretch", key="pf_sites")
st.caption("`leg2_` columns: a two-shot scheme's second leg. An empty counter: not reported by that codec, never 0.")

c1, c2 = st.columns(2)
stem = f"audit-{report['model'].rstrip('/').split('/')[-1]}-tp{report['tp']}"
with c1:
    st.download_button("Download the report (JSON)", report_json(report).encode(), file_name=f"{stem}.json",
                       mime="application/json", key="pf_dl_json", icon=":material/download:")
with c2:
    st.download_button("Download the report (Markdown)", report_markdown(run_id, report, _ui.root()).encode(),
                       file_name=f"{stem}.md", mime="text/markdown", key="pf_dl_md", icon=":material/download:")

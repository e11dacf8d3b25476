"""Layer error: how much error does each scheme add at each layer and module?

Reads the per-site errors of evaluate runs (``layer_errors`` of result.json); builds a scheme
from controls and starts an evaluate run for it."""
import numpy as np
import pandas as pd
import plotly.express as px
import streamlit as st

from launch.store.calibration import calibration_sources, spikiest_stored_sample
from launch.store.evaluate import layer_error_frame, scheme_fields, scheme_frame
from launch.store.problems import StoreProblem
from lowbit.analysis import rotation_view
from lowbit.scheme import QuantSpec, SchemeError
from lowbit.site import ROW_PARALLEL_MODULES
from pages import _controls, _ui

SECOND_CHOICES = {"int8": QuantSpec(8, True, "token"), "int6": QuantSpec(6, True, "token"),
                  "int4": QuantSpec(4, True, "token"),
                  "int8 static (calibrated ranges of the sum)": QuantSpec(8, True, "static"),
                  "same as the first leg": "same"}

st.title("Layer error: where does quantization hurt?")
st.markdown(
    "**What you will learn:** the error each scheme adds to the all-reduced output at every layer and module. "
    "*Local* error: that site alone is quantized, its inputs are exact -- what this site adds. *Accumulated*: every "
    "site is quantized, so errors from earlier layers flow in -- what the model really sees. Relative error = "
    "||quantized - exact|| / ||exact|| of the reduced sum; SNR = 10 log10(||exact||² / ||error||²).")


def scheme_builder() -> str | None:
    """Controls -> one scheme string (pages._controls builds it, lowbit.scheme checks it); None if
    it cannot be built."""
    c1, c2, c3, c4, c5 = st.columns(5)
    with c1:
        code = _controls.pick_code("le", help="int: a uniform grid; nf: a fixed normal-quantile codebook (NF4-style, "
                                              "3 or 4 bits), finer near zero where most values are; fp: a saturating "
                                              "minifloat (FP8 E4M3/E5M2, FP6, FP4 E2M1 as in MX / NVFP4), scale = "
                                              "absmax / the format's largest value; lm: a Lloyd-Max codebook fitted "
                                              "per site and rank on the calibration (2-4 bits)")
        asym = st.checkbox("Asymmetric (scale + min)", key="le_asym", disabled=not _controls.allows_asymmetric(code))
    with c2:
        gran = st.selectbox("Granularity", _controls.granularity_names(), key="le_gran",
                            help="static: per-feature scale from calibration; token: one scale per token; "
                                 "group: one scale per G features of a token")
        group = st.number_input("Group size G", min_value=1, value=32, step=8, key="le_group",
                                disabled=not _controls.is_sized(gran))
        scale_fmt = st.selectbox("Scale format", _controls.scale_names(), key="le_scale",
                                 disabled=not _controls.is_dynamic(gran),
                                 help="What each dynamic scale travels as: bf16 / fp32 / fp16 (saturates at "
                                      "65504) / e8m0 (a power of two, as MX) / e4m3 (float8 x one fp32 scale per "
                                      "message, as NVFP4); counted in the bits")
        permute = st.checkbox("Channel grouping", key="le_perm", disabled=gran != "group",
                              help="A calibrated permutation puts features of similar range in the same group "
                                   "before group-wise scales; undone after the sum; costs no bits")
    with c3:
        select = st.selectbox("Outliers in BF16", list(_controls.OUTLIER_CHOICES),
                              format_func=_controls.OUTLIER_CHOICES.get, key="le_select")
        per_token, threshold, k = 3, 6.0, "1/64"
        if select == "sparse":
            per_token = st.number_input("Values per token", min_value=1, max_value=64, value=3, key="le_sp",
                                        help="Each sends a uint16 index and a BF16 value: 32 bits")
        elif select == "threshold":
            threshold = st.number_input("Threshold |x|", min_value=0.0, value=6.0, step=1.0, key="le_thr",
                                        help="LLM.int8() uses 6")
            k = st.selectbox("Capacity (fraction of features)", _controls.K_CHOICES, index=1, key="le_k")
        else:
            k = st.selectbox("k (fraction of features)", _controls.K_CHOICES, index=1, key="le_k",
                             disabled=select == "none")
    with c4:
        algo = st.selectbox("Algorithm", ["gather", "two_shot"], key="le_algo",
                            help="gather: all-gather the quantized partials (the paper); two_shot: reduce-scatter "
                                 "then all-gather, requantizing the reduced sum")
        second_choice = st.selectbox("Second leg", list(SECOND_CHOICES), key="le_second", disabled=algo != "two_shot",
                                     help="The owner requantizes its reduced chunk per token (int), per feature "
                                          "with scales from the calibrated ranges of the reduced sum (static), "
                                          "or with the first leg's own format (e.g. an fp code on both legs)")
    with c5:
        rotation = st.selectbox("Rotation block", ["none", 16, 32, 64, 128], key="le_rot",
                                disabled=not _controls.is_dynamic(gran),
                                help="Block Walsh-Hadamard rotation before quantizing, undone after the sum "
                                     "(spreads a spike over its block; dynamic scales only). See 'Why rotation "
                                     "works' below.")
        stochastic = st.checkbox("Stochastic rounding", key="le_sr", disabled=not _controls.allows_stochastic(code),
                                 help="Unbiased rounding: floor(v + u), u uniform in [0, 1). On smollm2-135m TP 3 "
                                      "it makes the error of the sum over ranks larger than round-to-nearest "
                                      "(docs/results.md, 'Stochastic rounding').")
    try:
        return _controls.scheme_text(
            code, symmetric=not (asym and _controls.allows_asymmetric(code)), granularity=gran, group=group,
            scale=scale_fmt, outliers=select, k=k, per_token=per_token, threshold=threshold, rotation=rotation,
            stochastic=stochastic and _controls.allows_stochastic(code), permute=permute, algo=algo,
            second=SECOND_CHOICES[second_choice])
    except (SchemeError, ValueError, ZeroDivisionError) as exc:
        st.error(f"`{exc}`")
        return None


def run_scheme_form() -> None:
    st.markdown("Build a scheme, or type any scheme string (per-layer overrides too, e.g. "
                "`int4-static-top1/64;L0-3=int8-token`), and evaluate it against exact BF16 with per-layer errors.")
    built = scheme_builder()
    text = st.text_input("Scheme string", value=built or "", key=f"le_text_{built}",
                         help="python -m lowbit schemes prints the grammar")
    c1, c2, c3 = st.columns(3)
    model, tp = _ui.pick_model_tp("le", c1, c2)
    problems: list = []
    with c3:
        tokens = _ui.number_field("Evaluation tokens", "le_tokens", 512, problems, lo=1, step=128,
                                  field="eval_tokens")
    if _ui.job_button("Evaluate this scheme", key="le_go", refusal=_ui.start_refusal(), type="primary",
                      icon=":material/play_arrow:"):
        _ui.submit(dict(kind="evaluate", model=model, tp=int(tp), schemes=["bf16", text.strip()],
                        calib_tokens=2048, eval_tokens=int(tokens), tasks=[], items_per_task=0,
                        params=dict(seq_len=128, batch_size=4, layer_error=True, layer_error_chunks=1)),
                   problems=problems)


ROTATION_QUANTS = ["int4-token", "int3-token", "int4-group64", "int4-group32", "int8-token"]


def rotation_panel() -> None:
    """Why rotation works: one real partial (stored by calibration) before and after rotating."""
    st.markdown(
        "A rank's partial sum has a few huge values (massive activations). With one scale per token, the "
        "largest value sets the step, so the token's other values round to zero. The block Walsh-Hadamard "
        "rotation mixes each block of R features with +-1/sqrt(R) weights: a spike is spread over its block, the "
        "token's largest value shrinks towards its RMS, and the step with it. It is orthogonal and linear, so "
        "ranks rotate, quantize and send; the fp32 sum is rotated back once.")
    sources = _ui.calibration_sources()
    if sources.empty:
        st.info("No calibration yet: its stored sample partials feed this panel. The classroom demo makes one.")
        return
    labels = dict(zip(sources["folder"], sources["label"]))
    folder = st.selectbox("Calibration (its stored partials)", list(labels), format_func=labels.get, key="rot_cal")
    try:
        cal = _ui.calibration(folder)
        spiky = spikiest_stored_sample(cal)
    except StoreProblem as problem:  # missing, older or unreadable artifact: said, the page goes on
        st.warning(f"This calibration cannot be shown: {problem}")
        return
    hidden = cal.hidden
    blocks = [b for b in (8, 16, 32, 64, 128, 256) if hidden % b == 0]
    c1, c2, c3, c4, c5 = st.columns(5)
    with c1:
        layer = st.number_input("Layer", 0, cal.layers - 1, spiky[0], key="rot_layer",
                                help="Starts at the stored partial with the largest max/RMS")
    with c2:
        module = st.radio("Module", list(ROW_PARALLEL_MODULES), index=ROW_PARALLEL_MODULES.index(spiky[1]),
                          key="rot_module", horizontal=True)
    with c3:
        rank = st.selectbox("Rank", list(range(cal.tp)), index=spiky[2], key="rot_rank")
    with c4:
        block = st.selectbox("Block R", blocks, index=blocks.index(64) if 64 in blocks else len(blocks) - 1,
                             key="rot_block")
    with c5:
        quant = st.selectbox("Quantizer", ROTATION_QUANTS, key="rot_quant")
    # the controls offer only valid layers, ranks, blocks (divisors of hidden) and dynamic quantizers
    values, tokens = rotation_view(cal, int(layer), module, int(rank), int(block), quant)
    m1, m2, m3 = st.columns(3)
    m1.metric("Largest |value|, original -> rotated", f"{tokens['absmax'].max():.3g} -> "
              f"{tokens['absmax_rotated'].max():.3g}")
    m2.metric(f"{quant} error of the whole token (mean)", f"{tokens['error'].mean():.3f} -> "
              f"{tokens['error_rotated'].mean():.3f}")
    m3.metric(f"{quant} error of the rest (mean)", f"{tokens['rest_error'].mean():.3f} -> "
              f"{tokens['rest_error_rotated'].mean():.3f}",
              help="Relative error over every feature except each token's largest: what a spike does to its "
                   "neighbours")
    fig = px.histogram(values, x="value", color="stage", barmode="overlay", nbins=120, log_y=True, opacity=0.6,
                       labels=dict(value="value of the partial", stage=""),
                       color_discrete_sequence=["#d62728", "#1f77b4"])
    fig.update_layout(title=f"Layer {int(layer)} {module}, rank {int(rank)}: {len(tokens)} tokens x {hidden} "
                            f"values (count, log scale)", yaxis_title="count (log scale)")
    _ui.plot(_ui.style(fig, height=420), key="rot_hist")
    long = tokens.melt(id_vars="token", value_vars=["absmax", "absmax_rotated", "rms"], var_name="what",
                       value_name="magnitude").replace({"what": {"absmax": "largest |value|, original",
                                                                 "absmax_rotated": f"largest |value|, rotated (R={block})",
                                                                 "rms": "RMS (the same for both)"}})
    fig2 = px.bar(long, x="token", y="magnitude", color="what", barmode="group", log_y=True,
                  color_discrete_sequence=["#d62728", "#1f77b4", "#7f7f7f"],
                  labels=dict(token="token of the stored sample", magnitude="magnitude (log scale)", what=""))
    fig2.update_layout(title="Per token: the scale follows the largest value")
    _ui.plot(_ui.style(fig2, height=400), key="rot_tokens")
    st.caption("The sample is the first tokens of the first calibration batch, as each rank produced them. "
               "Rotation cannot help a token whose values are all alike, and a spike stays inside its block: "
               "with per-group scales of the block's size it changes little (try int4-group64 with R=64).")


def coinciding(frame: pd.DataFrame, column: str) -> list[list[str]]:
    """Groups of series whose ``column`` values are equal at every (layer, module, mode) they share."""
    wide = frame.pivot_table(index=["layer", "module", "mode"], columns="series", values=column)
    groups: list[list[str]] = []
    for name in wide.columns:
        for group in groups:
            # 1e-9: equal schemes store bit-identical errors; the margin only covers the JSON round trip
            if np.allclose(wide[group[0]], wide[name], rtol=1e-9, atol=0.0, equal_nan=True):
                group.append(name)
                break
        else:
            groups.append([name])
    return [g for g in groups if len(g) > 1]


run_id = _ui.pick_evaluate_run(key="le_run", need_layers=True)
if run_id is None:
    _ui.empty_state("No per-layer errors yet.",
                    "Evaluate runs measure them (the classroom demo does). Or evaluate a scheme of your own below.")
    with st.container(border=True):
        run_scheme_form()
    with st.expander("Why rotation works"):
        rotation_panel()
    st.stop()

data, problem = _ui.result(run_id)
errors = layer_error_frame(data)
if problem or errors.empty:
    st.error(f"Run {run_id} has no usable per-layer errors ({problem or 'empty layer_errors'}).")
    st.stop()
fields = pd.DataFrame([dict(scheme=s, **scheme_fields(s)) for s in errors["scheme"].unique()])
st.subheader("Pick schemes")
c1, c2, c3, c4 = st.columns(4)
pickers = {}
for col, name, label in ((c1, "family", "Code and bits"), (c2, "granularity", "Granularity"),
                         (c3, "k", "k (BF16 features)"), (c4, "select", "Selection")):
    with col:
        pickers[name] = _ui.filter_all(label, sorted(fields[name].dropna().astype(str).unique()), key=f"le_f_{name}")
chosen = fields
for name, values in pickers.items():
    chosen = chosen[chosen[name].astype(str).isin(values)]
c1, c2, c3 = st.columns(3)
with c1:
    metric = st.radio("Metric", ["relative error", "SNR (dB)"], horizontal=True, key="le_metric")
with c2:
    modes = st.multiselect("Mode", ["local", "accumulated"], default=["local", "accumulated"], key="le_modes")
with c3:
    legs = st.toggle("Show two-shot's first leg", value=True, key="le_legs",
                     help="Two-shot quantizes twice; its first-leg line shows the error before requantization.")

shown = errors[errors["scheme"].isin(chosen["scheme"]) & errors["mode"].isin(modes)]
if not legs:
    shown = shown[shown["leg"] == "final"]
if shown.empty:
    st.warning("No scheme matches these filters.")
else:
    shown = shown.assign(series=shown["scheme"] + shown["leg"].map(lambda g: " · leg 1" if g == "leg1" else ""))
    y = "rel_error" if metric == "relative error" else "snr_db"
    # a marker shape per scheme as well as a colour: schemes whose lines coincide stay tellable apart
    fig = px.line(shown.sort_values("layer"), x="layer", y=y, color="series", line_dash="mode", facet_col="module",
                  symbol="series", markers=True, log_y=y == "rel_error",
                  color_discrete_map=_ui.scheme_colors(sorted(shown["series"].unique())),
                  labels=dict(layer="layer", rel_error="relative error (log scale)", snr_db="SNR (dB)", series="scheme",
                              mode="mode"))
    fig.for_each_annotation(lambda a: a.update(text=a.text.replace("module=", ""), font_size=_ui.FONT + 2))
    if y == "rel_error":
        fig.update_yaxes(dtick=1, exponentformat="power")  # one label per decade
    fig.update_layout(title=f"{data.get('model')} TP {data.get('tp')}: "
                            f"{'higher is better' if y == 'snr_db' else 'lower is better'}")
    fig.update_traces(marker=dict(size=11, line=dict(width=1, color="white")))
    fig.update_xaxes(**_ui.integer_ticks(int(shown["layer"].max()) + 1))
    _ui.plot(_ui.style(fig, height=560), key="le_chart")
    same = coinciding(shown, y)
    if same:
        st.caption("Drawn on top of one another (the same value at every site and mode shown): "
                   + "; ".join(" = ".join(f"`{s}`" for s in group) for group in same) + ".")
    summary = (shown.groupby(["scheme", "mode", "leg"])
               .agg(mean_rel_error=("rel_error", "mean"), worst_rel_error=("rel_error", "max"),
                    mean_snr_db=("snr_db", "mean"), max_abs_error=("max_abs_error", "max"))
               .reset_index())
    worst = shown.loc[shown.groupby(["scheme", "mode", "leg"])["rel_error"].idxmax(), ["scheme", "mode", "leg",
                                                                                        "layer", "module"]]
    summary = summary.merge(worst.rename(columns=dict(layer="worst layer", module="worst module")),
                            on=["scheme", "mode", "leg"])
    st.dataframe(summary, hide_index=True, width="stretch")
    records = scheme_frame(data)
    clamped = records[records["clamped"].fillna(0) > 0][["scheme", "clamped", "nonfinite"]]
    if not clamped.empty:
        st.caption("Values clamped by static scales during the text evaluation (outside the calibrated range): "
                   + ", ".join(f"{r.scheme}: {int(r.clamped):,}" for r in clamped.itertuples()))
    overflow = records[records["thr_overflow"].fillna(0) > 0]
    if not overflow.empty:
        st.caption("Threshold schemes: features over the threshold that did not fit the message's BF16 capacity "
                   "(quantized instead), summed over this rank's text-evaluation messages: "
                   + ", ".join(f"{r.scheme}: {int(r.thr_overflow):,}" for r in overflow.itertuples()))

with st.expander("Evaluate another scheme"):
    run_scheme_form()

with st.expander("Why rotation works", expanded=False):
    rotation_panel()

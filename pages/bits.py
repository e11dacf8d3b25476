"""Bits: how many bits per value actually travel -- payload, BF16 outliers, scales, indices?

The accounting is lowbit.wire.payload's byte layout (via launch.store); measured totals come from
evaluate runs' records."""
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from launch.store.bits import SCHEME_PARTS
from launch.store.evaluate import evaluate_runs, scheme_frame
from lowbit.scheme import PRESETS as NAMED_PRESETS, SchemeError, parse_scheme
from lowbit.wire.payload import layout
from lowbit.wire.recipes import RECIPE_ALGOS
from pages import _ui

PRESETS = ["bf16", "int8-token", "int4-static", "int4-static-rand1/64", "int4-static-top1/64", "int4-token",
           "int4-group32", "int3a-group64-top1/64", "int4-token@twoshot+int8-token",
           # neighbouring work at about the paper's 4.19 bits: sparse pairs, threshold columns (with
           # their index list), channel grouping (free), the normal-quantile codebook
           "int4-static-sp3", "int4-token-thr6c1/64", "int4-group64-perm", "nf4-static-top1/64"]

st.title("Bits: what actually travels")
st.markdown(
    "**What you will learn:** a low-bit message is more than its 4-bit codes. Features kept in BF16 (outliers) "
    "and dynamic scales cost bits too; static scales and the outlier index list are fixed by calibration, known "
    "to every rank, and never sent (0 bits). Schemes that choose their outliers per message send where they are: "
    "sparse pairs (`-sp<n>`) carry a 16-bit index with each BF16 value, threshold columns (`-thr<T>c<K>`) a "
    "fixed-size index list. Two-shot sends twice: its first leg (the partials) and its second leg "
    "(the requantized reduced sum). Bits here are per value of one rank's partial sum (tokens x hidden).")

evals = _ui.evaluate_runs()
measured = pd.DataFrame()
if not evals.empty:
    data, _ = _ui.result(evals.iloc[0]["id"])
    measured = scheme_frame(data)
default_model = evals.iloc[0]["model"] if not evals.empty else "smollm2-135m"
names = _ui.model_names()
c1, c2 = st.columns(2)
with c1:
    model = st.selectbox("Model", names, index=names.index(default_model) if default_model in names else 0,
                         key="bits_model")
sizes = _ui.valid_tp_sizes(model)
default_tp = int(evals.iloc[0]["tp"]) if not evals.empty and int(evals.iloc[0]["tp"]) in sizes else \
    (3 if 3 in sizes else sizes[0])
with c2:
    tp = st.selectbox("TP size", sizes, index=sizes.index(default_tp), key="bits_tp")
shape = _ui.model_shape(model)
H, L = shape["hidden"], shape["layers"]

options = list(dict.fromkeys(PRESETS + [s for s in measured.get("scheme", []) if s != "fp32"]))
chosen = st.multiselect("Schemes", options, default=[s for s in PRESETS if s in options][:6], key="bits_schemes")
extra = st.text_input("Add a scheme string", key="bits_extra", placeholder="e.g. int2-group16-top1/32")
if extra.strip():
    chosen = chosen + [extra.strip()]

rows, problems = [], []
for s in chosen:
    try:
        rows.append(_ui.bits_parts(s, H, tp))
    except (SchemeError, ValueError) as exc:
        problems.append(f"`{_ui.clip(s, 80)}: {_ui.clip(exc)}`")
for p in problems:
    st.error(p)
if not rows:
    st.info("Pick at least one scheme above.")
    st.stop()
parts = pd.concat(rows, ignore_index=True)

st.header(f"Bits per value, {model} (hidden {H}) at TP {tp}")
fig = px.bar(parts, x="scheme", y="bits", color="part", pattern_shape="leg", color_discrete_map=_ui.PART_COLORS,
             category_orders=dict(part=list(SCHEME_PARTS), scheme=list(dict.fromkeys(parts["scheme"]))),
             labels=dict(bits="bits per value", scheme="scheme", part="part", leg="leg"))
_ui.reference_line(fig, 16, "BF16 all-reduce (16 bits)", dash="dash", color="#111")
if not measured.empty:
    m = measured[measured["scheme"].isin(parts["scheme"])]
    if not m.empty:
        fig.add_trace(go.Scatter(x=m["scheme"], y=m["bits_per_value"], mode="markers", name="measured in a run",
                                 marker=dict(symbol="diamond", size=16, color="#111",
                                             line=dict(color="white", width=2))))
totals = parts.groupby("scheme", sort=False)["bits"].sum()
# Totals as annotations raised above the bar top: a text trace sat under the measured diamonds.
fig.update_layout(annotations=[*fig.layout.annotations, *(
    dict(x=scheme, y=total, text=f"{total:.3f}", showarrow=False, yshift=26, font=dict(size=_ui.FONT))
    for scheme, total in totals.items())])
fig.update_layout(title="Stacked by part; hatched = two-shot's second leg", barmode="stack")
_ui.plot(_ui.style(fig, height=560), key="bits_stack")
st.caption("Diamonds: bits per value measured by the latest evaluate run (bytes handed to the collectives / values); "
           "they match the layout because lowbit.wire.payload is the one owner of both.")

st.header("Bytes per token")
traffic = pd.DataFrame([_ui.traffic_per_token(s, H, L, tp) for s in totals.index])
bf16_bytes = 2 * 2 * H * L
table = pd.DataFrame({
    "scheme": traffic["scheme"], "bits / value (mean over sites)": traffic["bits_per_value"].round(4),
    "message B / token / layer": traffic["message_bytes_per_layer"].round(1),
    f"KiB / token, {L} layers": (traffic["message_bytes"] / 1024).round(2),
    f"B each rank sends / token / layer (TP {tp})": traffic["sent_bytes_per_layer"].round(1),
    "message vs BF16": (traffic["message_bytes"] / bf16_bytes).map(lambda r: f"{r:.3f}x"),
})
st.dataframe(table, hide_index=True, width="stretch")
st.caption("Message: one rank's encoded partial sums for the layer's two all-reduces. Sent: what each rank puts on "
           "the wire with the scheme's collective (ring all-reduce for BF16, all-gather of payloads for quantized "
           "schemes, all-to-all + all-gather for two-shot).")

st.header("Per layer")
st.markdown("A scheme map can give layers their own bit widths (e.g. `int4-static-top1/64;L0-3=int8-token`).")
layer_scheme = st.selectbox("Scheme", list(totals.index), index=len(totals) - 1, key="bits_layer_scheme")
per_site = _ui.bits_per_site(layer_scheme, H, L, tp)
fig = px.bar(per_site, x="layer", y="bits", color="part", facet_col="module", pattern_shape="leg",
             color_discrete_map=_ui.PART_COLORS, category_orders=dict(part=list(SCHEME_PARTS)),
             labels=dict(layer="layer", bits="bits per value", part="part", leg="leg"))
fig.for_each_annotation(lambda a: a.update(text=a.text.replace("module=", ""), font_size=_ui.FONT + 2))
fig.add_hline(y=16, line=dict(dash="dash", color="#111"))
fig.update_layout(title=f"{layer_scheme}: bits per value at every site", barmode="stack")
_ui.plot(_ui.style(fig, height=460), key="bits_layers")

st.header("The formats shipping systems send")
st.markdown(
    "Named presets (`python -m lowbit schemes` lists them with their sources): MX and NVFP4 floating-point "
    "formats, QuickReduce's two-shot int codes, FlashInfer's and TensorRT-LLM's FP8 all-reduces. Each is an "
    "ordinary scheme string; its scales are counted like everything else (e8m0 = 8 bits per 32 values, NVFP4's "
    "e4m3 = 8 per 16 plus one fp32 per message). A preset whose group does not divide this model's hidden size "
    "(or its two-shot chunk) is shown at the next hidden size where it fits, named in its label; a preset whose "
    "system does not run at this TP size (QuickReduce: 2, 4, 8) says so in the table's note.")


def _fits(scheme, hidden: int) -> bool:
    try:
        scheme.validate_for(hidden, tp)
        return True
    except SchemeError:
        return False


def _tp_refusal(scheme) -> str:
    """Why the preset's system does not run at this TP size ('' when it does)."""
    try:
        scheme.validate_for(H, tp)
    except SchemeError as exc:
        return str(exc) if exc.field == "tp" else ""
    return ""


preset_rows, preset_table = [], []
for name, expansion in NAMED_PRESETS.items():
    scheme = parse_scheme(expansion)
    refused = _tp_refusal(scheme)
    if refused:
        preset_table.append({"preset": name, "expansion": expansion, "hidden": H, "note": refused})
        continue
    step = (scheme.quant.group_size or 1) * (tp if scheme.algo == "two_shot" else 1)
    hidden = H if _fits(scheme, H) else next(h for h in range(step, 64 * step + 1, step)
                                              if h >= H and _fits(scheme, h))
    label = name if hidden == H else f"{name} (hidden {hidden})"
    bits = _ui.bits_parts(expansion, hidden, tp).assign(scheme=label)
    preset_rows.append(bits)
    first = bits[bits["leg"] == bits["leg"].iloc[0]]["bits"].sum()
    if scheme.algo in RECIPE_ALGOS:  # a system's first leg is several messages (QuickReduce pads whole tiles)
        first = layout(8, hidden, scheme.quant).bits_per_value["total"]
    preset_table.append({"preset": name, "expansion": expansion, "hidden": hidden,
                         "bits / value, one message": round(float(first), 4),
                         f"bits / value, the call at TP {tp}": round(float(bits["bits"].sum()), 4), "note": ""})
presets_frame = pd.concat(preset_rows, ignore_index=True)
fig = px.bar(presets_frame, x="scheme", y="bits", color="part", pattern_shape="leg",
             color_discrete_map=_ui.PART_COLORS,
             category_orders=dict(part=list(SCHEME_PARTS), scheme=list(dict.fromkeys(presets_frame["scheme"]))),
             labels=dict(bits="bits per value", scheme="preset", part="part", leg="leg"))
_ui.reference_line(fig, 16, "BF16 all-reduce (16 bits)", dash="dash", color="#111")
_ui.reference_line(fig, 4.1875, "the paper (4.1875 bits)", dash="dot", color="#555")
fig.update_layout(title=f"Every preset at TP {tp}, stacked by part; hatched = two-shot's second leg",
                  barmode="stack")
_ui.plot(_ui.style(fig, height=520), key="bits_presets")
st.dataframe(pd.DataFrame(preset_table), hide_index=True, width="stretch")

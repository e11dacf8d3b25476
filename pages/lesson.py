"""Lesson: a guided 20-minute class through the app -- what to click, what to look for, one
question per step; the presentation toggle enlarges everything for a projector.

Pure text and links (no results needed); the steps point at the pages that hold the numbers."""
import streamlit as st

from pages import _teach

# (minutes, page, title, what to click, what to look for, question, what to notice)
STEPS = [
    (2, "pages/overview.py", "What travels in tensor parallelism",
     "Overview: pick smollm2-135m at TP 3 and read the diagram and the bytes-per-token table.",
     "Two all-reduces per layer (after o_proj and down_proj), each a full hidden vector per token in BF16.",
     "How many bytes per token does one layer all-reduce in BF16 at hidden 576?",
     "2 sites x 576 values x 2 bytes = 2304 bytes per token per layer, before the ring's 2(N-1)/N factor."),
    (3, "pages/outliers.py", "Outlier features are the same everywhere",
     "Outliers: look at the per-feature ranges of one rank, then the rank x rank and batch overlaps.",
     "A few features have ranges far above the rest, and the top-k sets overlap strongly across ranks and batches.",
     "If the same features are large on every batch, what can a calibration run do with that?",
     "Pick them once (static indices, no index bits on the wire) and keep them in BF16: the paper's top 1/64."),
    (3, "pages/playground.py", "Static int4 on a real partial",
     "Playground: Code int, Bits 4, Granularity static, BF16 outliers none. Then switch BF16 outliers to top.",
     "The histogram: orange clamped values beyond the dashed range; the per-feature error spikes at a few features.",
     "Switching to top 1/64 costs 0.1875 bits per value. Where do they go, and what happens to the SQNR?",
     "9 of 576 features travel in BF16 (9 x 16 / 576 = 0.25 bits of outliers, 567 x 4 / 576 = 3.94 of codes); the "
     "spiky features' error drops to BF16 rounding and the SQNR rises."),
    (3, "pages/playground.py", "Per-token scales and rotation",
     "Playground: Granularity token, BF16 outliers none; then turn Rotation on with block 64.",
     "Per token, one huge value sets the step for the whole token: most values land on the zero code. Rotation "
     "spreads the spike over its block.",
     "Rotation sends no extra bits. Why does the SQNR go up?",
     "The step follows the token's largest |value|; after rotation that is close to the token's RMS, so the step "
     "shrinks and every other value is resolved."),
    (2, "pages/playground.py", "Stochastic rounding and the sum over ranks",
     "Playground: tick Stochastic rounding and compare the two SQNR numbers (one message, sum over ranks).",
     "Stochastic rounding is unbiased but noisier per value.",
     "Does averaging over 3 ranks make unbiased rounding win?",
     "Not here: the sum's SQNR drops too (on smollm2-135m the sum's error is larger than with round-to-nearest "
     "at every width: docs/results.md, 'Stochastic rounding')."),
    (3, "pages/two_shot.py", "Two-shot, step by step",
     "Two-shot: walk the five steps; at the end look at the bytes-by-TP chart.",
     "Phase 1 sends each chunk once; the owner requantizes; phase 2 gathers one chunk per rank.",
     "Why does gathering quantized partials stop saving bytes at TP 8?",
     "Gather sends (N-1) whole payloads per rank; the BF16 ring only 2(N-1)/N of the message. At 4.19 bits and "
     "N = 8 that is 7 x 4.19 = 29 vs 2 x 7/8 x 16 = 28 bits per value: no saving. Two-shot sends (N-1)/N of "
     "both legs."),
    (3, "pages/where_it_pays.py", "Where it pays",
     "Where it pays: TP 8, Llama-2-13B; compare NVLink 4 with PCIe 4 and 100 GbE; then lower the codec speed.",
     "Stars mark the crossover; the green band is a decode step, the orange band a prefill.",
     "Does low-bit communication speed up decoding one sequence on NVLink?",
     "No, the model says: one decode token of Llama-2-13B is a 10 KiB message; at TP 8 on NVLink 4 the BF16 ring "
     "takes 14 us, the gather 17 us and two-shot 29 us (latency and codec dominate). Two-shot wins from 1024 "
     "tokens on NVLink, 64 on PCIe 4: prefill-sized messages on slower links are where it pays."),
    (1, "pages/tradeoffs.py", "Wrap-up: accuracy against bits",
     "Trade-offs (after the classroom demo or an evaluate run): accuracy kept against bits per value.",
     "The Pareto frontier: schemes no other scheme beats on both axes.",
     "Which scheme would you ship on PCIe at TP 8, and what would you measure first?",
     "Open question: use the frontier and the crossover together; measure KL on your own text."),
]

st.title("Lesson: low-bit communication in 20 minutes")
_teach.presentation_toggle("lesson")
st.markdown(f"**{len(STEPS)} steps, {sum(s[0] for s in STEPS)} minutes.** Each step says what to click, what to "
            "look for and asks one question; open the answer after the class has guessed. Presentation mode "
            "(above) enlarges text and plots on every page and hides the sidebar.")

labels = [f"{i + 1}. {s[2]} ({s[0]} min)" for i, s in enumerate(STEPS)]
# The step lives under a plain session key: streamlit forgets a widget's own key while another page is
# shown, and every step sends the class to another page.
STEP_KEY, PICK_KEY = "lesson_step_index", "lesson_step"
index = min(max(int(st.session_state.get(STEP_KEY, 0)), 0), len(STEPS) - 1)
if st.session_state.get(PICK_KEY) not in labels:
    st.session_state[PICK_KEY] = labels[index]


def go(to: int) -> None:
    to = min(max(to, 0), len(STEPS) - 1)
    st.session_state[STEP_KEY] = to
    st.session_state[PICK_KEY] = labels[to]


def picked() -> None:
    st.session_state[STEP_KEY] = labels.index(st.session_state[PICK_KEY])


st.progress((index + 1) / len(STEPS), text=f"step {index + 1} of {len(STEPS)}")
c1, c2, _ = st.columns([1, 1, 3])
with c1:
    st.button("Previous", key="lesson_prev", disabled=index == 0, icon=":material/arrow_back:",
              on_click=go, args=(index - 1,))
with c2:
    st.button("Next", key="lesson_next", disabled=index == len(STEPS) - 1, icon=":material/arrow_forward:",
              on_click=go, args=(index + 1,))
choice = st.selectbox("Step", labels, key=PICK_KEY, on_change=picked)
minutes, page, title, click, look, question, notice = STEPS[labels.index(choice)]

st.header(title)
st.markdown(f"**Click:** {click}")
st.page_link(page, label=f"Open {page.removeprefix('pages/').removesuffix('.py').replace('_', ' ')}",
             icon=":material/open_in_new:")
st.markdown(f"**Look for:** {look}")
st.markdown(f"**Question:** {question}")
with st.expander("What to notice (answer)"):
    st.markdown(notice)

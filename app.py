"""lowbit app entry point: `make run` (or `streamlit run app.py`).

Pages live in pages/ and are registered here with st.navigation; they read run results and
submit jobs, never doing model math themselves.
"""
import streamlit as st

st.set_page_config(page_title="lowbit: low-bit TP communication", layout="wide")

pages = {
    "Learn": [st.Page("pages/overview.py", title="Overview", default=True)],
}
st.navigation(pages).run()

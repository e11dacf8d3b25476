"""lowbit: low-bit communication for tensor-parallel LLM inference (library; no Streamlit)."""
__version__ = "0.1.0"

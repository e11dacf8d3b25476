"""The results store: run directories -> pandas DataFrames for the app's pages (no Streamlit).

Import each name from the module that owns it; this package re-exports nothing.

    from launch.store.runs import load_result, runs_frame
    runs_frame()                              # every run: status, kind, model, TP, times, progress
    data, problem = load_result(run_id)       # result.json, or why it cannot be read

One module per kind of answer:

- ``runs``: listing, spec, result, progress, events, logs (``runs_frame``, ``load_result``, ``log_tail``)
- ``evaluate``: scheme / task / layer-error frames, sweeps, Pareto front, comparisons (``scheme_frame``)
- ``calibration``: the calibration artifacts runs made or used (``calibration_sources``, ``load_calibration``)
- ``bits``: bits per value by leg and part, from ``lowbit.wire.accounting`` (``bits_parts``)
- ``machine``: cores, GPUs, the Slurm cluster's partitions, model shapes, valid TP sizes (``machine_info``,
  ``cluster_frame``)
- ``bench``: collective-bench records and where a quantized collective pays (``collective_frame``)
- ``teaching``: the Playground, Two-shot and Where-it-pays views (``playground_view``)
- ``problems``: the expected reasons an artifact cannot be shown (``StoreProblem``: missing, outdated,
  damaged), raised by the artifact loaders for the pages to explain in words

Cheap math on stored artifacts (ranges, overlaps, the rotation panel) is ``lowbit.analysis``;
scores with standard errors are ``lowbit.stats``. Every reader tolerates missing, half-written
or corrupt files: the run readers return a problem text, the artifact loaders raise a ``StoreProblem``.
"""

"""The results store: run directories -> pandas DataFrames for the app's pages (no Streamlit).

    from launch import store
    store.runs_frame()                        # every run: status, kind, model, TP, times, progress
    data, problem = store.load_result(run_id) # result.json, or why it cannot be read
    store.scheme_frame(data)                  # evaluate: one row per scheme (bits, ppl, KL, top-1, % kept)
    store.layer_error_frame(data)             # evaluate: error per layer / module / mode / leg
    store.calibration_sources(runs)           # every calibration artifact a run made or used
    store.bits_parts("int4-static-top1/64", hidden=576, tp=3)   # bits per value, stacked by part

One module per kind of answer: ``runs`` (listing, spec, result, progress, logs), ``evaluate``
(scheme / task / layer-error frames, sweeps, Pareto front, comparisons), ``calibration``
(artifacts), ``bits`` (accounting rows from ``lowbit.wire.accounting``), ``machine`` (cores, GPUs,
model shapes), ``bench`` (collective-bench records). Cheap math on stored artifacts (ranges,
overlaps, the rotation panel) is ``lowbit.analysis``, re-exported here so the pages have one
door. Every reader tolerates missing, half-written or corrupt files.
"""
from launch.store.runs import (  # noqa: F401 - the store's public names
    RUN_COLUMNS, read_json, run_paths, load_spec, load_result, run_progress, runs_frame, active_runs, finished_ok,
    log_tail,
    events_frame, codec_changes)
from launch.store.evaluate import (  # noqa: F401 - the store's public names
    scheme_fields, result_records, task_frame, SCHEME_COLUMNS, RECORD_NUMBERS, SCHEME_NUMERIC, scheme_frame,
    LAYER_ERROR_COLUMNS, layer_error_frame, evaluate_runs, sweep_summary, sweep_grid_candidates, pareto_front,
    compare_specs, compare_results)
from launch.store.calibration import (  # noqa: F401 - the store's public names
    calibration_folder, CALIBRATION_COLUMNS, calibration_sources, load_calibration)
from launch.store.bits import (  # noqa: F401 - the store's public names
    SCHEME_PARTS, DEFAULT_TOKENS, bits_parts, bits_per_site, traffic_per_token)
from launch.store.machine import (  # noqa: F401 - the store's public names
    model_shape, valid_tp_sizes, machine_info)
from launch.store.bench import (  # noqa: F401 - the store's public names
    crossover_table, gate_crossover, gate_records,
    COLLECTIVE_COLUMNS, collective_frame)
from lowbit.analysis import (  # noqa: F401 - cheap artifact math, through the store
    rotation_view, spikiest_sample, outlier_count, selected_features, feature_ranges, range_heatmap,
    random_jaccard, overlap_between_batches, overlap_between_ranks, overlap_between_layers,
    overlap_between_sources, ema_trace_frame)
from launch.store.teaching import (  # noqa: F401 - the teaching pages' frames
    playground_view, two_shot_view, bytes_by_tp, link_choices, projection_frame, crossovers, message_sizes,
    measured_link_records, fitted_links, playground_counterpart, projection_hidden)
from lowbit.stats import UNRESOLVED_NOTE, score_table  # noqa: F401 - scores with their standard errors

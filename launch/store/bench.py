"""Benchmark runs as frames: the collective bench's records (one row per measured configuration)."""
from __future__ import annotations

import pandas as pd

from launch.store.evaluate import result_records
from launch.store.runs import finished_ok, load_result

COLLECTIVE_COLUMNS = ["run_id", "tp", "tokens", "hidden", "method", "scheme", "median_ms", "speedup_vs_bf16",
                      "bytes_per_rank", "bits_per_value", "link", "message_mib"]


def collective_frame(frame: pd.DataFrame, root=None) -> pd.DataFrame:
    """Records of every done collective-bench run (one row per measured configuration)."""
    rows = []
    for _, run in finished_ok(frame, "collective-bench").iterrows():
        data, problem = load_result(run["id"], root)
        if problem:
            continue
        for r in result_records(data):
            row = dict(run_id=run["id"], **{k: r.get(k) for k in COLLECTIVE_COLUMNS[1:-1]})
            rows.append(row)
    out = pd.DataFrame(rows, columns=COLLECTIVE_COLUMNS)
    for col in ("tp", "tokens", "hidden", "median_ms", "speedup_vs_bf16", "bytes_per_rank", "bits_per_value"):
        out[col] = pd.to_numeric(out[col], errors="coerce")
    out["message_mib"] = out["tokens"] * out["hidden"] * 2 / 2**20
    return out.dropna(subset=["tp", "median_ms"])

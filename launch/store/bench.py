"""Benchmark runs as frames: the collective bench's records (one row per measured configuration)."""
from __future__ import annotations

import dataclasses

import pandas as pd

from launch.store.evaluate import result_records
from launch.store.runs import finished_ok, load_result, read_json, runs_frame
from launch.submit import REPO_ROOT
from lowbit.scheme import MAX_MIN_MESSAGE
from lowbit.wire import accounting

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


# -- the size gate's crossover (@minauto) -----------------------------------------------------------
SHIPPED_RECORDS = REPO_ROOT / "bench" / "results"  # collective-bench files measured on this machine kind


def gate_records(root=None) -> pd.DataFrame:
    """Every collective-bench record known here, newest measurement first: the store's done runs
    (run ids start with their time), then the shipped ``bench/results/collectives*.json`` files by
    their ``meta.date`` (``source`` says which; ``order`` ranks the sources, 0 newest)."""
    frames = []
    runs = collective_frame(runs_frame(root), root)
    for run_id in sorted(runs["run_id"].unique(), reverse=True):
        frames.append(runs[runs["run_id"] == run_id].assign(source=f"run {run_id}"))
    shipped = []
    for path in SHIPPED_RECORDS.glob("collectives*.json"):
        data, problem = read_json(path)
        rows = [r for r in result_records(data) if isinstance(r, dict) and r.get("median_ms") is not None]
        if problem or not rows:
            continue
        date = str(((data.get("meta") or {}).get("date")) or "")
        f = pd.DataFrame([{k: r.get(k) for k in COLLECTIVE_COLUMNS[1:-1]} for r in rows])
        shipped.append((date, f.assign(run_id=None, source=f"bench/results/{path.name}")))
    frames += [f for _, f in sorted(shipped, key=lambda t: t[0], reverse=True)]
    frames = [f.assign(order=i) for i, f in enumerate(frames)]
    if not frames:
        return pd.DataFrame(columns=[*COLLECTIVE_COLUMNS, "source"])
    out = pd.concat(frames, ignore_index=True)
    for col in ("tp", "tokens", "hidden", "speedup_vs_bf16", "bits_per_value"):
        out[col] = pd.to_numeric(out[col], errors="coerce")
    return out.dropna(subset=["tp", "tokens", "hidden", "speedup_vs_bf16"])


def gate_crossover(scheme, link: str, tp: int, records: pd.DataFrame) -> tuple[int | None, str]:
    """(bytes, where from) for ``@minauto``: the smallest BF16 message size from which the
    measured records of this link and TP size show the scheme's collective (gather / two-shot,
    the measured scheme nearest in bits) at least as fast as the BF16 all-reduce at every larger
    size. ``MAX_MIN_MESSAGE`` when no measured size wins (everything goes exact); None when there
    are no records for this link and TP size."""
    method = accounting.method_of(scheme)
    mine = records[(records["link"] == link) & (records["tp"] == tp) & (records["method"] == method)]
    if not len(mine):
        return None, f"no collective-bench records for {method} on link {link} at TP {tp}"
    mine = mine[mine["order"] == mine["order"].min()]
    bits = accounting.scheme_bits_per_value(dataclasses.replace(scheme, min_message=None), 576, tp, 1024)
    nearest = (mine["bits_per_value"] - bits).abs()
    chosen = mine[nearest == nearest.min()]
    chosen = chosen[chosen["order"] == chosen["order"].min()]  # the newest measurement of it
    source = chosen["source"].iloc[0]
    return _crossover(chosen), f"{source}: {chosen['scheme'].iloc[0]} on {link} at TP {tp}"


def _crossover(records: pd.DataFrame) -> int:
    """The one crossover rule: the smallest BF16 message size (bytes) from which every larger
    measured size has speedup >= 1; ``MAX_MIN_MESSAGE`` when the largest measured size loses."""
    by_size = records.assign(nbytes=records["tokens"] * records["hidden"] * 2).groupby("nbytes")["speedup_vs_bf16"].min()
    crossover = MAX_MIN_MESSAGE
    for nbytes in sorted(by_size.index, reverse=True):
        if not by_size[nbytes] >= 1.0:
            break
        crossover = int(nbytes)
    return crossover


def crossover_table(records: pd.DataFrame) -> pd.DataFrame:
    """Per (link, TP, method, scheme) of collective-bench records: from which message size the
    quantized collective pays (``_crossover``, the rule ``@minauto`` uses), in bytes and MiB, and
    the largest speedup measured; ``pays_from_mib`` is None where no measured size wins."""
    cols = ["link", "tp", "method", "scheme", "pays_from_bytes", "pays_from_mib", "best_speedup", "sizes"]
    rows = []
    quantized = records[records["method"] != "exact"].dropna(subset=["speedup_vs_bf16"])
    for (link, tp, method, scheme), g in quantized.groupby(["link", "tp", "method", "scheme"], sort=True):
        nbytes = _crossover(g)
        won = nbytes != MAX_MIN_MESSAGE
        rows.append(dict(link=link, tp=int(tp), method=method, scheme=scheme, pays_from_bytes=nbytes if won else None,
                         pays_from_mib=nbytes / 2**20 if won else None, best_speedup=float(g["speedup_vs_bf16"].max()),
                         sizes=int(g["tokens"].nunique())))
    return pd.DataFrame(rows, columns=cols)

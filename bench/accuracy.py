# Size: ~560 lines: one end-to-end bench (plan, run each step as a job, resume, tables); its parts share the plan and the runs file.
"""The accuracy tables of docs/results.md and docs/accuracy.md, end to end: calibrate, evaluate every scheme, write JSON/CSV/Markdown.

    python -m bench.accuracy --tp 3 --items 100 --out bench/results/accuracy.json
    python -m bench.accuracy --tp 3 --target-se 0.03 --pilot-items 20 --plan-only   # size it first
    python -m bench.accuracy ... --target-se 0.02 --min-bits 4 --max-minutes 90 --resume

Every step runs as a real torchrun job through the launch queue (so it also appears in the app's
Runs page): the calibration, the held-out text metrics and per-layer errors (one job), then one
job per task. Each step's run id is kept in ``*-runs.json`` next to ``--out`` as it finishes;
``--resume`` reads a finished step back instead of running it again (``--finished-only``: runs
nothing, writes the tables from the finished steps and names the tasks left out). Task accuracies carry their
standard error over items; the paired difference to the exact run on the same items (``Δ``) has
a much smaller one, and KL / top-1 agreement on held-out text are the low-noise measures.
Nothing here is tuned: the table is what the run measured.

Seconds per item per scheme: each task job times every scheme's forwards on rank 0
(``result.task_timing``, tokenizing and packing apart); right after a task job, this process scores
the same items once with the whole model and no communication (``bench.scoring.floor_seconds``:
the unsharded single-process floor), so the two are measured in the same hour. Each floor is kept
in ``*-floors.json`` next to ``--out`` with the task run it belongs to; ``--resume`` reads it back
with its run (a task run from before this file existed gets its floor now, and its row's
``floor_run`` says ``after_run: false``). Both, and their ratio, are printed and saved (``timing``) with the
floor's load averages.

Sizing to a target standard error (``--target-se``): the target is the SE of each task's *paired
Δ* (scheme minus the fp32 reference on the same items), for every scheme (``--min-bits``: every
scheme of at least that many measured bits per value), because Δ and "% kept" (whose SE is built
from Δ's, ``lowbit.stats.kept_pct``) are what the docs' conclusions rest on; a score's own SE
(~sqrt(p(1-p)/n), 0.5/sqrt(n) at worst) mostly measures how hard the items are, which is the same
for every scheme. A pilot evaluate (``--pilot-items`` per task) gives each task's per-item
variance of the differences for each scheme; the task needs ``n = var / se^2`` items for its
noisiest sized scheme (``lowbit.stats.items_for_se``), capped by its size
(``lowbit.model.data.task_table``, what ``python -m lowbit tasks`` prints); each task runs its own
n. The plan, with the score SE those items give and a time estimate from the pilot's measured
seconds per item per scheme, is printed (and saved next to ``--out`` as ``*-plan.json``) before
the full run starts; ``--plan-only`` stops there; ``--max-minutes`` scales a longer plan down to
fit and says what SE it then reaches.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import sys
import time
from pathlib import Path

from bench._meta import finish_meta, start_meta
from launch.client import submit_and_watch
from launch.kinds import codec as kind_codec
from launch.events import read_events
from launch.layout import run_paths
from bench.scoring import floor_seconds
from lowbit import stats
from lowbit.model.data import TASK_INFO, task_table

# The table: exact, Int8/4/3/2 on all features (static per-feature scales, as the paper's
# baseline), random-BF16 and top-k-BF16 Int4 (the paper), and a dynamic per-group scheme.
DEFAULT_SCHEMES = ["bf16", "int8-static", "int4-static", "int3-static", "int2-static", "int4-static-rand1/64",
                   "int4-static-top1/64", "int4-group32"]
DEFAULT_TASKS = ["arc_easy", "piqa", "winogrande"]


def run_job(spec: dict) -> tuple[str, dict]:
    """Queue ``spec``, watch it here with a progress bar, return (run id, result)."""
    code, run_id, result = submit_and_watch(spec)
    if result is None:
        raise SystemExit(f"{run_id or spec['kind']} did not finish (exit {code}); see above")
    return run_id, result


def flat_rows(result: dict) -> list[dict]:
    """One flat row per scheme: bits, text metrics, per-task primary score ± SE and paired Δ."""
    rows = []
    for r in result["records"]:
        row = dict(scheme=r["scheme"], bits_per_value=r["bits_per_value"], ppl=r["ppl"], kl=r["kl"],
                   top1_agreement=r["top1_agreement"], kept_pct=r.get("kept_pct"), kept_se=r.get("kept_se"),
                   avg_primary=r.get("avg_primary"),
                   clamped=r.get("clamped"), comm_seconds=r.get("comm_seconds"))
        deltas, delta_vars = [], []
        for task, t in (r.get("tasks") or {}).items():
            metric = t["primary"]
            row[f"{task}"] = t[metric]
            row[f"{task}_se"] = t[f"{metric}_se"]
            row[f"{task}_n"] = t["n"]
            row[f"{task}_delta"], row[f"{task}_delta_se"] = t.get("delta"), t.get("delta_se")
            deltas.append(t.get("delta", 0.0))
            delta_vars.append(t.get("delta_se", 0.0) ** 2)
        if deltas:
            row["avg_delta"] = sum(deltas) / len(deltas)
            row["avg_delta_se"] = math.sqrt(sum(delta_vars)) / len(deltas)
        rows.append(row)
    return rows


def markdown(result: dict, rows: list[dict], tasks: list[str]) -> str:
    head = ["scheme", "bits/value", "ppl", "KL", "top-1 %"] + [t for t in tasks] + ["avg %", "Δ avg (paired) pts", "kept %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [f"`{row['scheme']}`", f"{row['bits_per_value']:.4g}", f"{row['ppl']:.3f}", f"{row['kl']:.4f}",
                 f"{100 * row['top1_agreement']:.1f}"]
        cells += [f"{100 * row[t]:.1f} ± {100 * row[t + '_se']:.1f}" if t in row else "" for t in tasks]
        cells.append("" if row.get("avg_primary") is None else f"{100 * row['avg_primary']:.1f}")
        cells.append("" if "avg_delta" not in row else f"{100 * row['avg_delta']:+.1f} ± {100 * row['avg_delta_se']:.1f}")
        kept_se = (row.get("kept_se") if row["scheme"] != result.get("reference", "fp32") else None)
        cells.append(stats.fmt_pm(row.get("kept_pct"), kept_se)
                     + (" !" if kept_se is not None and stats.kept_is_unresolved(row.get("kept_pct"), kept_se) else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scheme_label(scheme: str) -> str:
    """A scheme as a table cell: a per-site map (``;``-separated overrides) by its default and the
    number of sites it overrides (the whole string is in the file's rows)."""
    if ";" not in scheme:
        return f"`{scheme}`"
    default, *overrides = scheme.split(";")
    return f"map: `{default}` + {len(overrides)} site overrides"


def paired_markdown(result: dict, rows: list[dict], tasks: list[str]) -> str:
    """The table the paper's question is read from: per task the primary score and, in brackets,
    the paired Δ to the reference on the same items ± its SE (points); "% kept" ± its SE ("!" where
    that SE exceeds the gap to 100 %); the reference row's scores carry their own SE instead."""
    reference = result.get("reference", "fp32")
    head = ["scheme", "bits/value", "KL", "top-1 %"] + [f"{t} ({TASK_INFO[t].primary})" for t in tasks] + ["kept %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [scheme_label(row["scheme"]), f"{row['bits_per_value']:.4g}", f"{row['kl']:.4f}",
                 f"{100 * row['top1_agreement']:.1f}"]
        for t in tasks:
            if t not in row:
                cells.append("")
            elif row["scheme"] == reference:
                cells.append(stats.fmt_pm(row[t], row[t + "_se"], 100))
            else:
                cells.append(f"{100 * row[t]:.1f} ({stats.fmt_pm(row[t + '_delta'], row[t + '_delta_se'], 100, signed=True)})")
        kept_se = row.get("kept_se") if row["scheme"] != reference else None
        cells.append(stats.fmt_pm(row.get("kept_pct"), kept_se)
                     + (" !" if kept_se is not None and stats.kept_is_unresolved(row.get("kept_pct"), kept_se) else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def se_summary(data: dict, min_bits: float) -> str:
    """One line: items per task, and the largest paired Δ SE of the schemes of at least
    ``min_bits`` bits per value, per task, against the plan's target (when the run was sized)."""
    result, reference = data["result"], data["result"].get("reference", "fp32")
    sized = [r for r in result["records"] if r["scheme"] != reference and r["bits_per_value"] >= min_bits]
    parts = []
    for task, n in result["items_per_task"].items():
        worst = max(sized, key=lambda r: r["tasks"][task]["delta_se"])
        parts.append(f"{task} {n} items, largest Δ SE {100 * worst['tasks'][task]['delta_se']:.2f} "
                     f"({scheme_label(worst['scheme'])})")
    plan = data.get("plan")
    target = f"; target {100 * plan['target_se']:g} points" if plan else ""
    return (f"Paired Δ SE in points over the {len(sized)} schemes of at least {min_bits:g} bits per value: "
            + "; ".join(parts) + target + ".")


def _floor_load(row: dict, floor: dict) -> str:
    """The load during a row's floor: its own (a per-task floor; "not after its run" when the task
    run is older than the floor), else the one floor of a file from before per-task floors."""
    own = row.get("floor_run") or {}
    load = own.get("load") or (floor or {}).get("load")
    if not load:
        return ""
    text = f"{load['start'][0]:.1f} -> {load['end'][0]:.1f}"
    return text if own.get("after_run", True) else text + " (not after its run)"


def timing_markdown(files: list[dict]) -> str:
    """Per model and task: items, seconds per item per scheme at TP N (mean of the schemes' forwards),
    the unsharded single-process floor's seconds per item, their ratio, and the floor's threads."""
    rows = []
    for data in files:
        result, floor = data["result"], data.get("floor") or {}
        for r in data["timing"]:
            rows.append([f"{result['model']} TP {result['tp']}", r["task"], str(r["items"]),
                         f"{r['seconds_per_item_per_scheme']:.3f}",
                         f"{r['floor_seconds_per_item']:.3f}" if "over_floor" in r else "",
                         f"{r['over_floor']:.2f}" if "over_floor" in r else "",
                         _floor_load(r, floor)])
    head = ["model", "task", "items", "s / item / scheme at TP N", "floor s / item (1 process)", "TP N / floor",
            "load during the floor"]
    return "| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n" + "\n".join("| " + " | ".join(r) + " |" for r in rows)


# -- sizing a run to a target standard error (see the module doc) ---------------------------------
def stage_seconds(events: list[dict]) -> dict[str, float]:
    """Seconds per stage of a run's events: each event's gap since the one before it is charged
    to its stage, and a ``tasks`` event to ``tasks:<task>``, the task its message names
    (``"arc_easy: item 8/20"``). The first stage after loading also carries the model load."""
    events = sorted(events, key=lambda e: e["time"])
    out: dict[str, float] = {}
    for prev, event in zip(events, events[1:]):
        key = event["stage"]
        if key == "tasks":
            key = "tasks:" + (event.get("message") or "").split(":", 1)[0]
        out[key] = out.get(key, 0.0) + event["time"] - prev["time"]
    return out


def phase_seconds(events: list[dict]) -> tuple[float, dict[str, float]]:
    """(seconds outside the task phase, {task: seconds}) of an evaluate run's events."""
    stages = stage_seconds(events)
    per_task = {k.split(":", 1)[1]: v for k, v in stages.items() if k.startswith("tasks:")}
    return sum(v for k, v in stages.items() if not k.startswith("tasks:")), per_task


def size_plan(pilot: dict, task_seconds: dict[str, float], other_seconds: float, target_se: float,
              available: dict[str, int], per_task: bool = False, min_bits: float | None = None,
              max_seconds: float | None = None) -> dict:
    """The items per task for each scheme's paired Δ to reach ``target_se``, from a pilot
    evaluate result (``pilot``), the pilot's seconds per task and outside the tasks, and each
    task's size. Without ``per_task`` the run uses the largest task's n for all (one
    ``items_per_task``); with it each task runs its own n, in its own job (``other_seconds`` is
    then paid once per job: the held-out text job and one per task). ``min_bits``: only schemes
    whose pilot measured at least that many bits per value drive the sizing (the others are
    sized for and reported, not waited for). ``max_seconds``: a plan estimated longer is scaled
    down, every task's n by the same factor (never below the pilot's), and says so; its expected
    SEs are those of the items it runs."""
    reference = pilot.get("reference", "fp32")
    records = {r["scheme"]: r for r in pilot["records"]}
    schemes = [s for s in records if s != reference]
    sized = [s for s in schemes if min_bits is None or records[s]["bits_per_value"] >= min_bits]
    runs_per_item = len(records)  # the reference runs every item too
    tasks = []
    for task, ref_row in records[reference]["tasks"].items():
        if task not in available:
            raise ValueError(f"tasks: {task!r} has no item count; allowed: {', '.join(available)}")
        primary, n_pilot = ref_row["primary"], ref_row["n"]
        per_scheme = {}
        for scheme in schemes:
            row = records[scheme]["tasks"][task]
            var = stats.paired_variance(row["delta_se"], row["n"])
            per_scheme[scheme] = dict(delta=row["delta"], flipped=row["flipped"], variance=var, sized=scheme in sized,
                                      items_needed=stats.items_for_se(var, target_se, available[task]))
        driver = max(sized, key=lambda s: per_scheme[s]["variance"]) if sized else None
        # never fewer than the pilot ran: a pilot without a single flip does not show a zero variance
        needed = min(available[task], max([n_pilot] + [per_scheme[s]["items_needed"] for s in sized]))
        tasks.append(dict(task=task, primary=primary, available=available[task], pilot_items=n_pilot,
                          pilot_reference_score=ref_row[primary], driving_scheme=driver, items_needed=needed,
                          seconds_per_item_per_scheme=task_seconds.get(task, 0.0) / (n_pilot * runs_per_item),
                          schemes=per_scheme))
    items = max((t["items_needed"] for t in tasks), default=0)
    jobs = 1 + len(tasks) if per_task else 1
    runs = {t["task"]: min(t["items_needed"] if per_task else items, t["available"]) for t in tasks}
    full = other_seconds * jobs + sum(t["seconds_per_item_per_scheme"] * runs[t["task"]] * runs_per_item for t in tasks)
    scale = None
    if max_seconds is not None and full > max_seconds:
        task_part = full - other_seconds * jobs
        scale = max(0.0, max_seconds - other_seconds * jobs) / task_part if task_part else 1.0
        runs = {t["task"]: min(t["available"], max(t["pilot_items"], int(runs[t["task"]] * scale))) for t in tasks}
    for t in tasks:
        n = runs[t["task"]]
        for r in t["schemes"].values():
            r["expected_se"] = math.sqrt(r["variance"] / n)
        worst = max((t["schemes"][s]["variance"] for s in sized), default=0.0)
        delta_se = math.sqrt(worst / n)
        t.update(items_run=n, expected_delta_se=delta_se,
                 expected_reference_se=math.sqrt(stats.bernoulli_variance(t["pilot_reference_score"]) / n),
                 reached=delta_se <= target_se,
                 estimated_seconds=t["seconds_per_item_per_scheme"] * n * runs_per_item)
    target = "se of each task's paired delta to the reference, every scheme" + (
        f" of at least {min_bits:g} bits per value" if min_bits is not None else "")
    return dict(target=target, target_se=target_se, reference=reference, schemes=schemes, sized_schemes=sized,
                items_per_task=runs if per_task else items, per_task=per_task, tasks=tasks, jobs=jobs,
                estimated_seconds=other_seconds * jobs + sum(t["estimated_seconds"] for t in tasks),
                estimated_seconds_outside_tasks=other_seconds * jobs, unscaled_estimated_seconds=full,
                max_seconds=max_seconds, time_scale=scale)


def _capped(task: dict) -> str:
    """Why a task of the plan misses the target: too few items in the task, or the time cap."""
    if task["reached"]:
        return ""
    if task["items_run"] < task["items_needed"]:
        return "  (capped by --max-minutes)"
    return "  (capped: task too small)"


def format_plan(plan: dict) -> str:
    """The plan as a text table (points, i.e. percent of items, for the standard errors)."""
    head = (f"{'task':<16}{'items':>7}{'pilot':>7}{'ref %':>7}{'needed':>8}{'run':>6}{'Δ se pts':>10}"
            f"{'score se':>10}{'s/item/scheme':>15}{'est s':>8}  driving scheme")
    lines = [f"target: SE of each task's paired Δ <= {100 * plan['target_se']:.1f} points, every scheme",
             head]
    for t in plan["tasks"]:
        lines.append(f"{t['task']:<16}{t['available']:>7}{t['pilot_items']:>7}{100 * t['pilot_reference_score']:>7.1f}"
                     f"{t['items_needed']:>8}{t['items_run']:>6}{100 * t['expected_delta_se']:>10.2f}"
                     f"{100 * t['expected_reference_se']:>10.2f}{t['seconds_per_item_per_scheme']:>15.3f}"
                     f"{t['estimated_seconds']:>8.0f}  {t['driving_scheme']}" + _capped(t))
    lines.append(f"items_per_task {plan['items_per_task']}; estimated {plan['estimated_seconds']:.0f} s "
                 f"({plan['estimated_seconds_outside_tasks']:.0f} s load + held-out text + layer errors, as the pilot measured)")
    if plan.get("time_scale") is not None:
        lines.append(f"the full plan was estimated at {plan['unscaled_estimated_seconds']:.0f} s, over the "
                     f"{plan['max_seconds']:.0f} s allowed (--max-minutes): every task's items scaled by "
                     f"{plan['time_scale']:.2f}; the Δ SEs above are what those items reach")
    return "\n".join(lines)


def check_sizing_args(parser: argparse.ArgumentParser, args) -> None:
    """Refuse sizing options out of range, naming the option."""
    if args.target_se is not None and not 0 < args.target_se < 0.5:
        parser.error(f"--target-se: must be > 0 and < 0.5 (a 0/1 score's SE is at most 0.5), got {args.target_se}")
    if args.pilot_items < 2:
        parser.error(f"--pilot-items: must be >= 2 (a variance needs two items), got {args.pilot_items}")
    for option, value in (("--plan-only", args.plan_only), ("--min-bits", args.min_bits is not None),
                          ("--max-minutes", args.max_minutes is not None)):
        if value and args.target_se is None:
            parser.error(f"{option}: needs --target-se (the plan sizes the run to it)")
    if args.finished_only and not args.resume:
        parser.error("--finished-only: needs --resume (it reads the finished steps of *-runs.json)")
    if args.max_minutes is not None and args.max_minutes <= 0:
        parser.error(f"--max-minutes: must be > 0, got {args.max_minutes}")


def available_items(tasks: list[str]) -> dict[str, int]:
    """Each task's item count, from the table ``python -m lowbit tasks`` prints."""
    unknown = [t for t in tasks if t not in TASK_INFO]
    if unknown:
        raise SystemExit(f"error: --tasks: {', '.join(unknown)} unknown; allowed: {', '.join(TASK_INFO)}")
    sizes = {row["task"]: row["items"] for row in task_table(tasks)}
    return {t: sizes[t] for t in tasks}


def plan_run(args, pilot_spec: dict, tasks: list[str], meta: dict, runs: "RunLog") -> dict:
    """Run the pilot, size the run, print and save the plan (``*-plan.json`` next to ``--out``)."""
    available = available_items(tasks)
    pilot_id, pilot = runs.run("pilot", pilot_spec)
    other, per_task = phase_seconds(read_events(run_paths(pilot_id).events))
    plan = size_plan(pilot, per_task, other, args.target_se, available, per_task=True, min_bits=args.min_bits,
                     max_seconds=None if args.max_minutes is None else 60.0 * args.max_minutes)
    plan.update(model=args.model, tp=args.tp, pilot_run=pilot_id, calibrate_run=pilot_spec["calib_from"],
                pilot_seconds=round(other + sum(per_task.values()), 1))
    out = Path(args.out)
    path = out.with_name(out.stem + "-plan.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(meta=finish_meta(dict(meta, load=dict(meta["load"]))), plan=plan), indent=2))
    print(format_plan(plan))
    print(f"wrote {path}")
    return plan


class RunLog:
    """The runs one bench invocation made, by step (``calibrate``, ``pilot``, ``text``,
    ``task:<name>:<items>``), kept in ``*-runs.json`` next to ``--out`` after each step: with
    ``--resume`` a step whose run finished is read back from its ``result.json`` instead of run
    again, so a long table survives an interrupted session."""

    def __init__(self, path: Path, resume: bool, finished_only: bool = False):
        self.path = path
        self.steps: dict[str, str] = json.loads(path.read_text()) if resume and path.exists() else {}
        self.finished_only = finished_only  # --finished-only: read steps back, run none

    def finished(self, step: str) -> bool:
        done = self.steps.get(step)
        return bool(done) and run_paths(done).result.exists()

    def run(self, step: str, spec: dict) -> tuple[str, dict]:
        if self.finished(step):
            done = self.steps[step]
            print(f"{step}: reusing run {done}")
            return done, json.loads(run_paths(done).result.read_text())
        if self.finished_only:
            raise SystemExit(f"--finished-only: step {step} has no finished run in {self.path}")
        run_id, result = run_job(spec)
        self.steps[step] = run_id
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.steps, indent=2))
        return run_id, result


class FloorLog:
    """Each task's single-process floor (``bench.scoring.floor_seconds`` of its items), by step
    (``task:<name>:<items>``), kept in ``*-floors.json`` next to ``--out`` with the task run it was
    measured after: a floor is measured once per task run, in the same hour as that run when the run
    is new, and read back with it by ``--resume``."""

    def __init__(self, path: Path, resume: bool):
        self.path = path
        self.floors: dict[str, dict] = json.loads(path.read_text()) if resume and path.exists() else {}

    def floor(self, step: str, run_id: str, ran_now: bool, measure) -> dict:
        """The floor of ``step``'s items for task run ``run_id``: the one kept for that run, else
        ``measure()`` (one task's ``floor_seconds``), kept with ``after_run`` = ``ran_now`` (the task
        job ran in this invocation just before it)."""
        kept = self.floors.get(step)
        if kept is not None and kept.get("task_run") == run_id:
            return kept
        measured = measure()
        task = step.split(":")[1]
        entry = dict(measured["tasks"][task], task_run=run_id, after_run=ran_now, threads=measured["threads"],
                     load=measured["load"], measured_at=time.strftime("%Y-%m-%d %H:%M:%S"))
        self.floors[step] = entry
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.floors, indent=2))
        return entry


def merge_results(text: dict, by_task: dict[str, dict]) -> dict:
    """One evaluate result from the held-out text job and one job per task: the text job's records
    with every task job's task rows, % kept and the average primary score recomputed over them,
    and each task's ``task_timing``."""
    records = []
    for rec in text["records"]:
        tasks = {}
        for result in by_task.values():
            tasks.update(next(r for r in result["records"] if r["scheme"] == rec["scheme"])["tasks"])
        records.append(dict(rec, tasks=tasks))
    reference = next(r for r in records if r["scheme"] == text["reference"])["tasks"]
    for rec in records:
        rec["kept_pct"], rec["kept_se"] = stats.kept_pct(rec["tasks"], reference)
        primaries = [t[t["primary"]] for t in rec["tasks"].values()]
        rec["avg_primary"] = sum(primaries) / len(primaries) if primaries else None
    items = {t: r["items_per_task"] for t, r in by_task.items()}
    return dict(text, records=records, items_per_task=items, task_timing={t: r["task_timing"] for t, r in by_task.items()})


def timing_rows(result: dict, floor: dict | None) -> list[dict]:
    """Per task: items, seconds per item per scheme at TP N (each scheme's forwards on rank 0, and
    their mean), the unsharded single-process floor's seconds per item, and their ratio."""
    rows = []
    for task, timing in result["task_timing"].items():
        per_scheme = {s: v["seconds_per_item"] for s, v in timing["schemes"].items()}
        mean = sum(per_scheme.values()) / len(per_scheme)
        row = dict(task=task, items=timing["items"], seconds_per_item_per_scheme=mean, per_scheme=per_scheme,
                   shared_seconds=timing["shared_seconds"], scorer=timing["scorer"])
        if floor is not None:
            entry = floor["tasks"][task]
            f = entry["seconds_per_item"]
            row.update(floor_seconds_per_item=f, over_floor=mean / f, floor_acc=entry["acc"],
                       floor_acc_norm=entry["acc_norm"])
            if "after_run" in entry:  # a per-task floor (FloorLog): its own load, and whether it followed its run
                row.update(floor_run=dict(after_run=entry["after_run"], load=entry["load"]))
        rows.append(row)
    return rows


def format_timing(rows: list[dict], tp: int) -> str:
    head = f"{'task':<14}{'items':>7}{'s/item/scheme TP ' + str(tp):>22}{'floor s/item':>14}{'ratio':>8}"
    lines = [head]
    for r in rows:
        lines.append(f"{r['task']:<14}{r['items']:>7}{r['seconds_per_item_per_scheme']:>22.4f}"
                     + (f"{r['floor_seconds_per_item']:>14.4f}{r['over_floor']:>8.2f}" if "over_floor" in r else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tp", type=int, default=3)
    parser.add_argument("--schemes", default=",".join(DEFAULT_SCHEMES))
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    parser.add_argument("--items", type=int, default=60, help="items per task (seeded subset)")
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="chunks per forward (default 4; 2 halves the memory of Gemma's 262k-vocab logits)")
    parser.add_argument("--calib-from", default=None, help="reuse this calibrate run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/accuracy.json")
    parser.add_argument("--target-se", type=float, default=None,
                        help="size the run so each task's paired Δ has this standard error (0.03 = 3 points); "
                             "replaces --items")
    parser.add_argument("--pilot-items", type=int, default=20, help="items per task of the sizing pilot")
    parser.add_argument("--plan-only", action="store_true", help="print and save the plan, run nothing more")
    parser.add_argument("--min-bits", type=float, default=None,
                        help="with --target-se: size for the schemes of at least this many bits per value only")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="with --target-se: scale a plan estimated longer down to this many minutes")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the finished runs this command recorded in *-runs.json next to --out")
    parser.add_argument("--finished-only", action="store_true",
                        help="with --resume: write the tables from the steps already finished, run none; "
                             "a task of the plan without a finished run is left out and named (missing_tasks)")
    parser.add_argument("--codec", choices=kind_codec.CODECS, default="kernels",
                        help="kernels: kernels.dispatch inside the communicators (the same numbers, less time); "
                             "reference: lowbit's torch path")
    parser.add_argument("--no-floor", action="store_true",
                        help="skip the unsharded single-process run of the same items (the timing floor)")
    args = parser.parse_args(argv)
    check_sizing_args(parser, args)
    run_meta = start_meta("bench.accuracy", sys.argv[1:] if argv is None else list(argv))
    schemes = [s for s in args.schemes.split(",") if s]
    tasks = [t for t in args.tasks.split(",") if t]
    start = time.time()
    out = Path(args.out)
    runs = RunLog(out.with_name(out.stem + "-runs.json"), args.resume, args.finished_only)
    common = dict(model=args.model, tp=args.tp, backend="auto", calib_data="wikipedia", calib_tokens=args.calib_tokens,
                  time_limit_s=7 * 24 * 3600.0, params=dict(seq_len=args.seq_len))
    if args.batch_size is not None:
        common["params"]["batch_size"] = args.batch_size
    calib_id = args.calib_from
    if calib_id is None:
        calib_id, _ = runs.run("calibrate", dict(common, kind="calibrate"))
    base = dict(common, kind="evaluate", schemes=schemes, calib_from=calib_id, eval_data="wikipedia", seed=args.seed)

    def spec(task_list: list[str], items: int, eval_tokens: int, layer_error: bool) -> dict:
        params = dict(common["params"], layer_error=layer_error, layer_error_chunks=1, codec=args.codec)
        return dict(base, params=params, tasks=task_list, items_per_task=items, eval_tokens=eval_tokens)

    plan = None
    items = dict.fromkeys(tasks, args.items)
    if args.target_se is not None:
        plan = plan_run(args, spec(tasks, args.pilot_items, args.seq_len, False), tasks, run_meta, runs)
        if args.plan_only:
            return 0
        items = {t["task"]: t["items_run"] for t in plan["tasks"]}
    text_id, text = runs.run("text", spec([], 0, args.eval_tokens, True))
    by_task, task_runs = {}, {}
    missing = [t for t in tasks if args.finished_only and not runs.finished(f"task:{t}:{items[t]}")]
    tasks = [t for t in tasks if t not in missing]
    if missing:
        print(f"--finished-only: no finished run for {', '.join(missing)}; the tables leave them out")
    floors, floor_tasks = FloorLog(out.with_name(out.stem + "-floors.json"), args.resume), {}
    for task in tasks:
        step = f"task:{task}:{items[task]}"
        ran_now = not runs.finished(step)
        task_runs[task], by_task[task] = runs.run(step, spec([task], items[task], args.seq_len, False))
        if not args.no_floor:  # measured right after its task job, in the same hour
            floor_tasks[task] = floors.floor(step, task_runs[task], ran_now,
                                             lambda t=task: floor_seconds(args.model, [t], {t: items[t]}, args.seed))
    items = {t: items[t] for t in tasks}
    result = merge_results(text, by_task)
    floor = None if args.no_floor else dict(tasks=floor_tasks)
    timing = timing_rows(result, floor)
    rows = flat_rows(result)
    table = markdown(result, rows, tasks)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = dict(command=run_meta["command"],
                machine=f"{platform.machine()}, {__import__('os').cpu_count()} CPU cores, {platform.system()}",
                date=time.strftime("%Y-%m-%d"), wall_seconds=round(time.time() - start, 1),
                calibrate_run=calib_id, evaluate_run=text_id, task_runs=task_runs, missing_tasks=missing)
    out.write_text(json.dumps(dict(info, meta=finish_meta(run_meta), plan=plan, result=result, rows=rows,
                                   timing=timing, floor=floor), indent=2))
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "scheme", k))
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    counts = ", ".join(f"{t} {n}" for t, n in items.items())
    meta = (f"{args.model}, TP {args.tp}, {result['eval_tokens']} held-out tokens ({result['eval_source']}), "
            f"items per task: {counts} (seed {args.seed}), calibration: {result['calibration']['tokens']} tokens "
            f"of {result['calibration']['source']}; {info['machine']}, {info['date']}, {info['wall_seconds']:.0f} s")
    out.with_suffix(".md").write_text(f"{meta}\n\n{table}\n\n`{info['command']}`\n")
    print(meta)
    print(table)
    print(format_timing(timing, args.tp))
    print(f"wrote {out}, {out.with_suffix('.csv')}, {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

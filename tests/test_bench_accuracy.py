"""bench.accuracy's sizing to a target standard error: the plan from a hand-made pilot result,
the per-stage seconds from events, the refused options, and (slow) --plan-only through the queue."""
from __future__ import annotations

import json
import math

import pytest

from bench.accuracy import format_plan, main, phase_seconds, size_plan, stage_seconds


def _task(primary_score: float, n: int, delta: float = 0.0, delta_se: float = 0.0, flipped: int = 0) -> dict:
    """A task row shaped like ``evaluate_tasks`` writes it (only the fields the plan reads)."""
    return dict(primary="acc", acc=primary_score, acc_se=math.sqrt(primary_score * (1 - primary_score) / n), n=n,
                delta=delta, delta_se=delta_se, flipped=flipped)


def pilot_result() -> dict:
    # 20 pilot items per task; int4's differences have variance 20 * se^2 = 0.2 on both tasks,
    # bf16 flipped nothing (variance 0)
    int4_se = math.sqrt(0.2 / 20)
    return dict(reference="fp32", records=[
        dict(scheme="fp32", tasks=dict(arc_easy=_task(0.6, 20), piqa=_task(0.5, 20))),
        dict(scheme="bf16", tasks=dict(arc_easy=_task(0.6, 20), piqa=_task(0.5, 20))),
        dict(scheme="int4", tasks=dict(arc_easy=_task(0.5, 20, -0.1, int4_se, 4), piqa=_task(0.45, 20, -0.05, int4_se, 4)))])


def test_size_plan_on_a_hand_computed_pilot():
    # arc_easy: 30 s for 20 items x 3 runs (fp32, bf16, int4) = 0.5 s per item per scheme
    plan = size_plan(pilot_result(), {"arc_easy": 30.0, "piqa": 12.0}, 40.0, 0.03, {"arc_easy": 570, "piqa": 100})
    arc, piqa = plan["tasks"]
    assert arc["schemes"]["int4"]["variance"] == pytest.approx(0.2)
    # 0.2 / 0.03^2 = 222.2 -> 223 items; bf16 saw no flip: never below the pilot's 20
    assert arc["schemes"]["int4"]["items_needed"] == 223 and arc["schemes"]["bf16"]["items_needed"] == 1
    assert arc["items_needed"] == 223 and arc["driving_scheme"] == "int4"
    assert piqa["items_needed"] == 100  # capped by the task's 100 items
    assert plan["items_per_task"] == 223  # one items_per_task for the whole evaluate: the largest
    assert arc["items_run"] == 223 and piqa["items_run"] == 100
    assert arc["expected_delta_se"] == pytest.approx(math.sqrt(0.2 / 223)) and arc["reached"]
    assert piqa["expected_delta_se"] == pytest.approx(math.sqrt(0.2 / 100)) and not piqa["reached"]
    assert arc["expected_reference_se"] == pytest.approx(math.sqrt(0.6 * 0.4 / 223))
    assert arc["seconds_per_item_per_scheme"] == pytest.approx(0.5)
    assert piqa["seconds_per_item_per_scheme"] == pytest.approx(12.0 / 60)
    # 40 s outside the tasks + 223 x 3 x 0.5 + 100 x 3 x 0.2
    assert plan["estimated_seconds"] == pytest.approx(40.0 + 334.5 + 60.0)
    text = format_plan(plan)
    assert "capped" in text and "items_per_task 223" in text


def test_stage_seconds_charge_each_gap_to_the_stage_that_ended_it():
    events = [dict(time=0.0, stage="loading"), dict(time=5.0, stage="text", message="held-out batch 1/1"),
              dict(time=8.0, stage="tasks", message="arc_easy: item 10/20"),
              dict(time=10.0, stage="tasks", message="arc_easy: item 20/20"),
              dict(time=13.0, stage="tasks", message="piqa: item 20/20"),
              dict(time=14.5, stage="layer-error", message="int4 (local)"), dict(time=15.0, stage="done")]
    assert stage_seconds(events) == {"text": 5.0, "tasks:arc_easy": 5.0, "tasks:piqa": 3.0, "layer-error": 1.5,
                                     "done": 0.5}
    assert phase_seconds(events) == (7.0, {"arc_easy": 5.0, "piqa": 3.0})


@pytest.mark.parametrize("argv, option", [(["--target-se", "0"], "--target-se"), (["--target-se", "0.5"], "--target-se"),
                                          (["--target-se", "0.03", "--pilot-items", "1"], "--pilot-items"),
                                          (["--plan-only"], "--plan-only"), (["--min-bits", "4"], "--min-bits"),
                                          (["--target-se", "0.03", "--max-minutes", "0"], "--max-minutes"),
                                          (["--finished-only"], "--finished-only")])
def test_sizing_options_out_of_range_are_refused_naming_the_option(argv, option, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert f"error: {option}:" in capsys.readouterr().err


@pytest.mark.slow
def test_plan_only_sizes_a_tiny_model_through_the_queue(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LOWBIT_RUNS", str(tmp_path / "runs"))
    out = tmp_path / "accuracy.json"
    assert main(["--model", "tiny-llama", "--tp", "2", "--schemes", "bf16,int2-static", "--tasks", "arc_easy",
                 "--calib-tokens", "128", "--eval-tokens", "64", "--seq-len", "32", "--target-se", "0.1",
                 "--pilot-items", "4", "--plan-only", "--out", str(out)]) == 0
    saved = json.loads((tmp_path / "accuracy-plan.json").read_text())
    assert set(saved["meta"]) == {"command", "date", "load", "machine"}
    plan = saved["plan"]
    task = plan["tasks"][0]
    assert task["task"] == "arc_easy" and task["pilot_items"] == 4 and task["available"] == 570
    # each task its own n (its own job): a dict by task
    assert 4 <= plan["items_per_task"]["arc_easy"] <= 570 and task["seconds_per_item_per_scheme"] > 0
    assert not out.exists()  # --plan-only runs no full evaluate
    assert "items_per_task" in capsys.readouterr().out


def test_per_task_plan_sizes_each_task_for_the_schemes_of_enough_bits_and_fits_a_time_cap():
    pilot = pilot_result()
    bits = dict(fp32=32.0, bf16=16.0, int4=4.0)
    for rec in pilot["records"]:
        rec["bits_per_value"] = bits[rec["scheme"]]
    # int4 below --min-bits 8: nothing drives the sizing but bf16 (no flip): each task keeps the pilot's 20
    plan = size_plan(pilot, {"arc_easy": 30.0, "piqa": 12.0}, 40.0, 0.03, {"arc_easy": 570, "piqa": 100},
                     per_task=True, min_bits=8)
    assert plan["sized_schemes"] == ["bf16"] and plan["items_per_task"] == {"arc_easy": 20, "piqa": 20}
    assert plan["tasks"][0]["schemes"]["int4"]["expected_se"] == pytest.approx(math.sqrt(0.2 / 20))
    # per task: arc_easy 223, piqa its 100; 3 jobs (text + 2 tasks) pay the 40 s outside the tasks
    plan = size_plan(pilot, {"arc_easy": 30.0, "piqa": 12.0}, 40.0, 0.03, {"arc_easy": 570, "piqa": 100},
                     per_task=True)
    assert plan["items_per_task"] == {"arc_easy": 223, "piqa": 100} and plan["jobs"] == 3
    assert plan["estimated_seconds"] == pytest.approx(3 * 40.0 + 223 * 3 * 0.5 + 100 * 3 * 0.2)
    # capped at 300 s: 180 s left for the tasks' 394.5 -> every n times 0.4563 (never below the pilot's 20)
    capped = size_plan(pilot, {"arc_easy": 30.0, "piqa": 12.0}, 40.0, 0.03, {"arc_easy": 570, "piqa": 100},
                       per_task=True, max_seconds=300.0)
    scale = (300.0 - 120.0) / (223 * 3 * 0.5 + 100 * 3 * 0.2)
    assert capped["time_scale"] == pytest.approx(scale)
    assert capped["items_per_task"] == {"arc_easy": int(223 * scale), "piqa": int(100 * scale)}
    assert capped["estimated_seconds"] <= 300.0
    arc = capped["tasks"][0]
    assert arc["expected_delta_se"] == pytest.approx(math.sqrt(0.2 / int(223 * scale))) and not arc["reached"]
    assert "scaled by 0.46" in format_plan(capped)


def _job_result(task: str, acc: dict[str, float], seconds: dict[str, float], items: int) -> dict:
    return dict(reference="fp32", items_per_task=items, records=[
        dict(scheme=s, tasks={task: dict(_task(a, items), delta=a - acc["fp32"], delta_se=0.01)}) for s, a in acc.items()],
        task_timing=dict(scorer="packed", items=items, shared_seconds=0.5,
                         schemes={s: dict(seconds=v, seconds_per_item=v / items) for s, v in seconds.items()}))


def test_task_jobs_merge_into_one_result_with_kept_and_timing_beside_the_floor():
    from bench.accuracy import merge_results, timing_rows
    text = dict(reference="fp32", eval_tokens=2048, records=[
        dict(scheme="fp32", bits_per_value=32.0, kl=0.0, tasks={}), dict(scheme="int4", bits_per_value=4.0, kl=0.3, tasks={})])
    arc = _job_result("arc_easy", dict(fp32=0.6, int4=0.5), dict(fp32=10.0, int4=14.0), 100)
    piqa = _job_result("piqa", dict(fp32=0.7, int4=0.7), dict(fp32=4.0, int4=6.0), 50)
    merged = merge_results(text, {"arc_easy": arc, "piqa": piqa})
    int4 = next(r for r in merged["records"] if r["scheme"] == "int4")
    assert set(int4["tasks"]) == {"arc_easy", "piqa"} and int4["kl"] == 0.3
    assert int4["avg_primary"] == pytest.approx(0.6)
    assert int4["kept_pct"] == pytest.approx(100 * (0.5 / 0.6 + 0.7 / 0.7) / 2)
    assert merged["items_per_task"] == {"arc_easy": 100, "piqa": 50}
    floor = dict(tasks=dict(arc_easy=dict(seconds_per_item=0.04, acc=0.6, acc_norm=0.5),
                            piqa=dict(seconds_per_item=0.05, acc=0.7, acc_norm=0.7)))
    rows = timing_rows(merged, floor)
    assert rows[0]["seconds_per_item_per_scheme"] == pytest.approx((0.1 + 0.14) / 2)  # the schemes' mean
    assert rows[0]["over_floor"] == pytest.approx(0.12 / 0.04)
    assert rows[1]["per_scheme"] == {"fp32": pytest.approx(0.08), "int4": pytest.approx(0.12)}
    assert "over_floor" not in timing_rows(merged, None)[0]


def test_resume_reads_a_finished_step_back_instead_of_running_it(tmp_path, monkeypatch):
    from bench import accuracy
    monkeypatch.setenv("LOWBIT_RUNS", str(tmp_path / "runs"))
    from launch.layout import run_paths
    paths = run_paths("20260101-000000-evaluate-abcdef")
    paths.dir.mkdir(parents=True)
    paths.result.write_text(json.dumps({"records": []}))
    log = tmp_path / "accuracy-runs.json"
    log.write_text(json.dumps({"text": "20260101-000000-evaluate-abcdef"}))
    monkeypatch.setattr(accuracy, "run_job", lambda spec: pytest.fail("a finished step ran again"))
    assert accuracy.RunLog(log, resume=True).run("text", {}) == ("20260101-000000-evaluate-abcdef", {"records": []})
    calls = []
    monkeypatch.setattr(accuracy, "run_job", lambda spec: calls.append(spec) or ("20260101-000001-evaluate-fedcba", {}))
    fresh = accuracy.RunLog(log, resume=False)  # without --resume every step runs, and is recorded
    fresh.run("text", {"kind": "evaluate"})
    assert calls == [{"kind": "evaluate"}] and json.loads(log.read_text()) == {"text": "20260101-000001-evaluate-fedcba"}


def test_finished_only_reads_finished_steps_back_and_runs_none(tmp_path, monkeypatch):
    """--finished-only (an interrupted plan written up from what finished): a finished step is read
    back, a step without a finished run (none recorded, or recorded but its run died without a
    result) stops the bench naming the step, and no job is ever queued."""
    from bench import accuracy
    monkeypatch.setenv("LOWBIT_RUNS", str(tmp_path / "runs"))
    from launch.layout import run_paths
    done, died = "20260101-000000-evaluate-abcdef", "20260101-000002-evaluate-dead00"
    run_paths(done).dir.mkdir(parents=True)
    run_paths(done).result.write_text(json.dumps({"records": [1]}))
    run_paths(died).dir.mkdir(parents=True)
    log = tmp_path / "accuracy-runs.json"
    log.write_text(json.dumps({"task:arc_easy:77": done, "task:hellaswag:70": died}))
    monkeypatch.setattr(accuracy, "run_job", lambda spec: pytest.fail("--finished-only queued a job"))
    runs = accuracy.RunLog(log, resume=True, finished_only=True)
    assert runs.finished("task:arc_easy:77") and not runs.finished("task:hellaswag:70")
    assert not runs.finished("task:piqa:111")
    assert runs.run("task:arc_easy:77", {}) == (done, {"records": [1]})
    for step in ("task:hellaswag:70", "task:piqa:111"):
        with pytest.raises(SystemExit, match=f"--finished-only: step {step} has no finished run"):
            runs.run(step, {})


def test_each_tasks_floor_is_kept_with_its_task_run_and_read_back_by_resume(tmp_path):
    """The floor is measured right after its task job and kept with that run (``*-floors.json``):
    --resume reads it back (no second measurement at another load), a new run of the step gets a new
    floor, and a row says whether its floor followed its run and at what load."""
    from bench.accuracy import FloorLog, _floor_load, merge_results, timing_rows
    measured = []

    def measure(spi, load):
        def run():
            measured.append(spi)
            return dict(tasks=dict(arc_easy=dict(items=100, seconds=100 * spi, seconds_per_item=spi, acc=0.6,
                                                 acc_norm=0.5)), threads=2, load=dict(start=[load], end=[load + 1]))
        return run
    path = tmp_path / "accuracy-floors.json"
    first = FloorLog(path, resume=False).floor("task:arc_easy:100", "run-a", True, measure(0.04, 1.0))
    assert measured == [0.04] and first["after_run"] and first["task_run"] == "run-a"
    again = FloorLog(path, resume=True).floor("task:arc_easy:100", "run-a", False, measure(0.09, 9.0))
    assert measured == [0.04] and again == first                        # read back, not measured at load 9
    other = FloorLog(path, resume=True).floor("task:arc_easy:100", "run-b", False, measure(0.05, 5.0))
    assert measured == [0.04, 0.05] and not other["after_run"]         # another run of the step: its own floor
    assert json.loads(path.read_text())["task:arc_easy:100"]["task_run"] == "run-b"
    text = dict(reference="fp32", eval_tokens=2048, records=[dict(scheme="fp32", bits_per_value=32.0, kl=0.0, tasks={})])
    merged = merge_results(text, {"arc_easy": _job_result("arc_easy", dict(fp32=0.6), dict(fp32=12.0), 100)})
    row = timing_rows(merged, dict(tasks={"arc_easy": first}))[0]
    assert row["over_floor"] == pytest.approx(0.12 / 0.04) and row["floor_run"]["after_run"]
    assert _floor_load(row, {}) == "1.0 -> 2.0"
    late = timing_rows(merged, dict(tasks={"arc_easy": other}))[0]
    assert _floor_load(late, {}) == "5.0 -> 6.0 (not after its run)"
    old_file = timing_rows(merged, dict(tasks={"arc_easy": dict(seconds_per_item=0.04, acc=0.6, acc_norm=0.5)},
                                        load=dict(start=[3.0], end=[4.0])))[0]
    assert _floor_load(old_file, dict(load=dict(start=[3.0], end=[4.0]))) == "3.0 -> 4.0"  # one floor per file

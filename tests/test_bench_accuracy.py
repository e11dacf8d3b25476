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
                                          (["--plan-only"], "--plan-only")])
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
    assert 4 <= plan["items_per_task"] <= 570 and task["seconds_per_item_per_scheme"] > 0
    assert not out.exists()  # --plan-only runs no full evaluate
    assert "items_per_task" in capsys.readouterr().out

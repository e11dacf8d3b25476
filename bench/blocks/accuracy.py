"""The tables of docs/accuracy.md: what a task item costs (``bench.scoring``, ``bench.accuracy``'s
timing beside the single-process floor) and the accuracy tables sized to a target standard error,
each from its files under bench/results/."""
from __future__ import annotations

from bench.accuracy import paired_markdown, se_summary, timing_markdown
from bench.blocks import block, load, source_line
from bench.scoring import speed_markdown

SCORING = "scoring-smollm2-135m-tp3.json"
SMOLLM2 = "accuracy-smollm2-135m-tp3.json"
GEMMA3 = "accuracy-gemma3-270m-tp2.json"
SIZED_BITS = 4  # the target: a paired SE of 2 points for every scheme of at least 4 bits


def _runs(data: dict) -> str:
    """The runs behind a per-task bench.accuracy file: calibration, held-out text, one per task."""
    tasks = ", ".join(f"{t} `{r}`" for t, r in data["task_runs"].items())
    planned = (data.get("plan") or {}).get("items_per_task", {})
    missing = "".join(f"; {t}: planned ({planned.get(t, '?')} items), no finished run (--finished-only left it out)"
                      for t in data.get("missing_tasks", []))
    return (f"calibrate run `{data['calibrate_run']}`, held-out text run `{data['evaluate_run']}`, task runs: {tasks}; "
            f"{data['wall_seconds']:.0f} s in the last invocation (--resume reads the finished runs back){missing}")


def _accuracy(name: str) -> str:
    data = load(name)
    tasks = list(data["result"]["items_per_task"])
    return (paired_markdown(data["result"], data["rows"], tasks) + "\n\n" + se_summary(data, SIZED_BITS) + "\n\n"
            + source_line(name, data, _runs(data)))


@block("scoring-speed")
def scoring_speed() -> str:
    data = load(SCORING)
    return speed_markdown(data) + "\n\n" + source_line(SCORING, data)


@block("accuracy-timing")
def accuracy_timing() -> str:
    files = [(name, load(name)) for name in (SMOLLM2, GEMMA3)]
    return timing_markdown([data for _, data in files]) + "\n\n" + "\n\n".join(
        source_line(name, data) for name, data in files)


@block("accuracy-smollm2-tp3")
def accuracy_smollm2() -> str:
    return _accuracy(SMOLLM2)


@block("accuracy-gemma3-tp2")
def accuracy_gemma3() -> str:
    return _accuracy(GEMMA3)

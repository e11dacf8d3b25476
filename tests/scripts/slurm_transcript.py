"""The transcript in docs/slurm.md: real commands against the test cluster (tests/slurm_cluster.py,
as root), their output saved with this machine's paths made relative.

    .venv/bin/python tests/scripts/slurm_transcript.py docs/slurm-transcript.txt

It starts the cluster (nodes n1, n2; partitions debug, main, spare), then: sinfo; a spec refused
at submit; an evaluate of tiny-llama at TP 2 submitted with executor slurm and watched to its end;
the run's slurm.json and batch script; a sweep of 4 points as a job array, 2 at a time, with
squeue while it runs; the sweep's answer per budget. The cluster is stopped at the end.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from tests.slurm_cluster import PARTITIONS, LocalSlurm  # noqa: E402

PY = ".venv/bin/python"
TINY = dict(model="tiny-llama", tp=2, backend="gloo", calib_tokens=256, eval_tokens=64, tasks=[],
            executor="slurm", partition="main", time_limit_s=600, params=dict(seq_len=32, batch_size=2))


def main(out: str) -> int:
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="lowbit-slurm-") as tmp:
        tmp = Path(tmp)
        runs = tmp / "runs"

        def relative(text: str) -> str:
            return text.replace(str(runs), "runs").replace(str(tmp), "<tmp>").replace(str(REPO) + "/", "") \
                .replace(str(REPO), ".")

        with LocalSlurm(tmp / "cluster", partitions=PARTITIONS) as cluster:
            env = dict(cluster.env, LOWBIT_RUNS=str(runs), LOWBIT_CACHE=str(tmp / "cache"))

            def show(args: list[str], keep=None) -> str:
                done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
                text = (done.stdout + done.stderr).rstrip("\n")
                kept = text.splitlines()
                if keep:
                    kept = keep(kept)
                lines.append("$ " + relative(shlex.join(args)))
                lines.extend(relative(line) for line in kept)
                lines.append("")
                return text

            def write(name: str, spec: dict) -> str:
                (tmp / name).write_text(json.dumps(spec, indent=1))
                lines.append(f"$ cat <tmp>/{name}")
                lines.extend(json.dumps(spec, indent=1).splitlines())
                lines.append("")
                return str(tmp / name)

            def ends(kept):  # a --wait progress bar prints a line per change: its first and last ones
                return kept[:3] + ["[...]"] + kept[-4:] if len(kept) > 9 else kept

            show(["sinfo"])
            bad = write("bad.json", dict(kind="selftest", model="none", tp=2, executor="slurm", partition="gpu",
                                         time_limit_s=600))
            show([PY, "-m", "launch", "submit", bad])
            spec = write("evaluate.json", dict(kind="evaluate", schemes=["int4-token", "int4-static-top1/64"], **TINY))
            text = show([PY, "-m", "launch", "submit", spec, "--wait"], keep=ends)
            run_id = text.split()[1]
            show(["cat", str(runs / run_id / "slurm.json")])
            show(["cat", str(runs / run_id / "slurm.sbatch")])
            show(["squeue", "--states=all", "-o", "%.6i %.9P %.40j %.10T %.10M %.8r %N"])

            sweep = write("sweep.json", dict(kind="sweep", schemes=["int4-token", "int3-token", "int2-token"],
                                             max_concurrent=2, **TINY))
            text = show([PY, "-m", "launch", "submit", sweep])
            sweep_id = text.split()[1]
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:  # wait until two points run and two wait for the limit
                states = cluster.command("squeue", "-h", "--array", "--name", f"lowbit-{sweep_id}", "-o", "%T|%r")
                if states.count("RUNNING") == 2 and "JobArrayTaskLimit" in states:
                    break
                time.sleep(0.3)
            show(["squeue", "--array", "-o", "%.8i %.9P %.40j %.10T %.18r %N"])
            show([PY, "-m", "launch", "tail", sweep_id, "--follow"], keep=ends)
            show([PY, "-c", "from launch.store.evaluate import sweep_summary; from launch.layout import run_paths; "
                  f'import json; print(sweep_summary(json.loads(run_paths("{sweep_id}").result.read_text()))'
                  ".to_string(index=False))"])
    Path(out).write_text("\n".join(lines))
    print(f"wrote {out} ({len(lines)} lines)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "docs/slurm-transcript.txt"))

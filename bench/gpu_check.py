# Size: ~520 lines: the orchestrator, its per-step time limits and the report printer; the steps live in gpu_check_kernels/_ranks.
"""One command for a GPU machine: kernels, kernel speed, shared-GPU ranks, the TP engine and the
collective bench on CUDA, each step time-limited, every step's result a JSON file under OUT.

    bash bench/gpu_check.sh OUT                        # what `make gpu-check OUT=dir` runs
    python3 -m bench.gpu_check --out OUT                # the same, with this python
    python3 -m bench.gpu_check --out OUT --steps tp_engine collectives   # a rerun of two steps
    python3 -m bench.gpu_check --device cpu --quick --out gpu-check-out  # CPU-safe mode (the test)
    python3 -m bench.gpu_check --report OUT             # the tables, from the files of a run

It runs under the GPU machine's own python (torch 2.11, triton 3.6 there), never the project
.venv. Steps, in order (``STEPS``; each one a child process with its own time limit, killed
with its whole process group at the limit; a step that fails or times out still leaves its
file, with ``status`` and the end of its log, and the next step runs):

``shared_gpu`` (``bench.gpu_check_ranks``)
    torchrun ranks on one GPU: NCCL with two ranks on one device (expected refused: the
    message is recorded), then ``lowbit.comm.dist.init_from_env("auto")`` at TP 2 and 4 (gloo with
    CUDA tensors, ``lowbit.comm.placement``) with all_reduce / all_gather / uneven all_to_all on
    CUDA tensors checked against their expected values.
``kernels_equal`` (``bench.gpu_check_kernels``)
    ``pytest tests/test_kernels.py tests/test_rotation_kernel.py`` with the Triton kernels
    compiled on CUDA (``bench.gpu_check_plugin``: the tests' cases unchanged, tensors moved to
    the GPU), then every kernel at 8192 x 5120 with NaN / Inf / near-fp32-max / clamped values,
    bytes compared with ``kernels.reference`` on the same device and on the CPU.
``kernel_speed`` (``bench.gpu_check_kernels``)
    GB/s (bytes read + written) of each kernel against a device-to-device copy of the same
    bytes, 64 KB to 64 MB messages, CUDA events, medians, inputs rotated past the L2.
``tp_engine`` (``bench.gpu_check_ranks``)
    a random-init model with Llama-2-13B layer shapes (4 layers; no weights travel) at TP 2 and
    4: sharded vs unsharded fp32 logits, then bf16 prefill / decode tok/s for ``bf16`` and
    ``int4-static-top1/64`` (Triton codec) and the communicator's share of the step time.
``collectives``
    ``bench.collectives`` through the launch queue at TP 2, 4 and 3 over the sizes of
    bench/results/collectives-loopback-grid.json, one job per TP size.

``summary.json`` (written first and after every step) names the GPU, the versions, the date and
each step's status, seconds and headline numbers. ``gpu_check.log`` holds every step's output.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from launch import procs

REPO = Path(__file__).resolve().parent.parent
STEPS = ("shared_gpu", "kernels_equal", "kernel_speed", "tp_engine", "collectives")
# Seconds per step on the GPU (full mode) and on the CPU (quick mode); the whole run stops
# starting steps once TOTAL_LIMIT_S is spent, and each step gets at most what is left.
STEP_LIMIT_S = dict(shared_gpu=40, kernels_equal=120, kernel_speed=70, tp_engine=120, collectives=110)
QUICK_LIMIT_S = dict(shared_gpu=90, kernels_equal=120, kernel_speed=60, tp_engine=120, collectives=150)
TOTAL_LIMIT_S = 470.0
LOG_TAIL_CHARS = 3000
SUMMARY = "summary.json"
LOG = "gpu_check.log"

# The fields a reader of the step files relies on (docs/gpu-check.md), per file (tests/test_gpu_check.py holds
# the quick run's files to them).
COMMON_FIELDS = ("step", "status", "device", "quick", "started", "seconds", "limit_s", "error", "checks")
STEP_FIELDS = {
    "shared_gpu": ("nccl_same_device", "gloo_cuda"),
    "kernels_equal": ("pytest", "large"),
    "kernel_speed": ("rows", "target", "fixed_cost_us", "by_kernel"),
    "tp_engine": ("model", "runs"),
    "collectives": ("params", "jobs", "records"),
}
SUMMARY_FIELDS = ("created", "finished", "device", "gpu", "python", "torch", "triton", "transformers", "cuda",
                  "driver", "quick", "steps", "total_seconds", "compat")


# -- files -----------------------------------------------------------------------------------
def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, data: dict) -> None:
    """Atomic write (a reader never sees half a file, also when the step is killed mid-write)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str, allow_nan=True))
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def step_file(out: Path, name: str) -> Path:
    return Path(out) / f"{name}.json"


class StepRecord:
    """A step's JSON file, rewritten after every piece of work (``save``) so a step killed at its
    limit leaves what it had measured; ``finish`` marks it done."""

    def __init__(self, out: Path, name: str, device: str, quick: bool, limit_s: float):
        self.path = step_file(out, name)
        self.start = time.perf_counter()
        self.data = dict(step=name, status="running", device=device, quick=quick, started=now_iso(), seconds=0.0,
                         limit_s=limit_s, error=None, checks={})
        self.save()

    def __getitem__(self, key):
        return self.data[key]

    def __setitem__(self, key, value):
        self.data[key] = value

    def save(self) -> None:
        self.data["seconds"] = round(time.perf_counter() - self.start, 3)
        write_json(self.path, self.data)

    def finish(self, error: str | None = None) -> None:
        self.data["status"] = "failed" if error else "ok"
        self.data["error"] = error
        self.save()


# -- environment -----------------------------------------------------------------------------
def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - a missing package is reported as None
        return None


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def torch_features() -> dict:
    """Feature detection (never a version compare) of the torch APIs this project calls or could
    meet across torch 2.11 (the GPU machine) and 2.13 (the pin): True where present here."""
    import torch
    import torch.distributed as dist
    dynamo = None
    try:
        import torch._dynamo.config as dynamo
    except Exception:  # noqa: BLE001 - reported as missing
        pass
    return dict(
        gloo=dist.is_available() and dist.is_gloo_available(),
        nccl=dist.is_available() and dist.is_nccl_available(),
        all_to_all_single=hasattr(dist, "all_to_all_single"),
        all_gather_into_tensor=hasattr(dist, "all_gather_into_tensor"),
        reduce_scatter_tensor=hasattr(dist, "reduce_scatter_tensor"),
        compile=hasattr(torch, "compile"),
        mark_dynamic=dynamo is not None and hasattr(torch._dynamo, "mark_dynamic"),
        # the dynamo options a torch.compile path would patch (none ships since kernels/fused_cpu.py went)
        **{f"dynamo.{k}": dynamo is not None and hasattr(dynamo, k)
           for k in ("capture_scalar_outputs", "automatic_dynamic_shapes", "recompile_limit",
                     "accumulated_recompile_limit")},
        float8_e4m3fn=hasattr(torch, "float8_e4m3fn"),
        float4_e2m1fn_x2=hasattr(torch, "float4_e2m1fn_x2"),
        uint16=hasattr(torch, "uint16"),
    )


def env_info(device: str) -> dict:
    import torch
    features = torch_features
    info = dict(device=device, python=platform.python_version(), executable=sys.executable,
                machine=platform.machine(), cpu_count=os.cpu_count(), torch=torch.__version__,
                triton=_version("triton"), transformers=_version("transformers"), numpy=_version("numpy"),
                cuda=torch.version.cuda, gpu=None, gpu_count=0, driver=None, compat=features())
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                    capability=list(torch.cuda.get_device_capability(0)),
                    memory_gib=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count,
                    l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1), driver=_driver())
    return info


# -- the orchestrator ------------------------------------------------------------------------
def _tail(path: Path, start: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read().decode(errors="replace")[-LOG_TAIL_CHARS:]
    except OSError:
        return ""


def step_command(name: str, out: Path, device: str, quick: bool, limit_s: float) -> list[str]:
    """The child's command line for one step (this module in ``--step`` mode)."""
    return [sys.executable, "-m", "bench.gpu_check", "--step", name, "--out", str(out), "--device", device,
            "--limit-s", str(limit_s)] + (["--quick"] if quick else [])


def run_step(name: str, out: Path, device: str, quick: bool, limit_s: float, log_path: Path) -> dict:
    """Run one step as a child process (own process group) under ``limit_s``; return its file's
    data, completed by the parent when the child died or was killed before finishing it."""
    cmd = step_command(name, out, device, quick, limit_s)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if device == "cpu" and name == "kernels_equal":
        env["TRITON_INTERPRET"] = "1"  # the kernels under the Triton interpreter (no GPU)
    Path(out).mkdir(parents=True, exist_ok=True)
    path = step_file(out, name)
    if path.exists():
        path.unlink()
    start_offset = log_path.stat().st_size if log_path.exists() else 0
    start = time.perf_counter()
    with open(log_path, "ab") as log:
        log.write(f"\n==== {name} ({now_iso()}, limit {limit_s:.0f} s) ====\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        timed_out = stopped = False
        try:
            rc = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            end_process_group(proc)
            rc = proc.wait()
        except StopRun:  # the whole run was told to stop (e.g. the shell's timeout)
            stopped = True
            end_process_group(proc)
            rc = proc.wait()
    seconds = time.perf_counter() - start
    data = read_json(path)
    if data is None:
        data = dict(step=name, status="running", device=device, quick=quick, started=now_iso(), seconds=seconds,
                    limit_s=limit_s, error=None, checks={})
    if timed_out or stopped:
        why = f"its limit of {limit_s:.0f} s" if timed_out else "the stop of the whole run (SIGTERM)"
        data.update(status="timeout", error=f"killed at {why} (partial results kept)")
    elif data.get("status") != "ok" and data.get("status") != "failed":
        data.update(status="failed", error=data.get("error") or f"exit code {rc} before the step finished")
    elif rc != 0 and data.get("status") == "ok":
        data.update(status="failed", error=f"exit code {rc} after the step wrote its results")
    if data["status"] != "ok":
        data["log_tail"] = _tail(log_path, start_offset)
    data["seconds"] = round(seconds, 3)
    write_json(path, data)
    if stopped:
        raise StopRun(data)
    return data


class StopRun(Exception):
    """SIGTERM reached the orchestrator: the step in flight is ended and recorded, no more start."""


def _raise_stop(signum, frame):
    raise StopRun()


def end_process_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """End the step's process group (the child and e.g. its torchrun ranks): TERM, then KILL what
    is left after ``grace_s`` (``launch.procs.kill_group``), and reap the child."""
    procs.kill_group(proc.pid, grace_s)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass


def headline(data: dict) -> dict:
    """The few numbers of a step that the summary repeats."""
    name, h = data.get("step"), {}
    if name == "kernels_equal":
        p = data.get("pytest") or {}
        h = dict(pytest_passed=p.get("passed"), pytest_failed=p.get("failed"),
                 large_all_equal=data.get("checks", {}).get("large_bytes_equal_same_device"))
    elif name == "kernel_speed":
        h = dict(target=data.get("target"), fixed_cost_us=data.get("fixed_cost_us"))
    elif name == "shared_gpu":
        n = data.get("nccl_same_device") or {}
        h = dict(nccl_refused=n.get("refused"), gloo_cuda_ok=data.get("checks", {}).get("gloo_cuda_collectives"))
    elif name == "tp_engine":
        h = {f"tp{r.get('tp')}": dict(logits_match=r.get("logits_match"), max_abs_diff=r.get("max_abs_logit_diff"),
                                      speed={s["scheme"]: dict(prefill_tok_s=s.get("prefill_tokens_per_s"),
                                                               decode_tok_s=s.get("decode_tokens_per_s"),
                                                               comm_share=s.get("comm_share"))
                                             for s in r.get("schemes", [])})
             for r in data.get("runs", [])}
    elif name == "collectives":
        h = dict(records=len(data.get("records") or []),
                 jobs={str(j.get("tp")): j.get("status") for j in data.get("jobs") or []})
    return h


def run_all(out: Path, device: str, quick: bool, steps: list[str], total_limit_s: float) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / LOG
    started = time.perf_counter()
    info = env_info(device)
    summary = dict(created=now_iso(), finished=None, quick=quick, total_seconds=0.0, total_limit_s=total_limit_s,
                   steps=[dict(step=s, status="pending") for s in steps], **info)
    write_json(out / SUMMARY, summary)
    limits = QUICK_LIMIT_S if quick else STEP_LIMIT_S
    for i, name in enumerate(steps):
        left = total_limit_s - (time.perf_counter() - started)
        if left < 10:
            summary["steps"][i] = dict(step=name, status="skipped", error=f"total limit of {total_limit_s:.0f} s spent")
            write_json(step_file(out, name), dict(step=name, status="skipped", device=device, quick=quick,
                                                  started=now_iso(), seconds=0.0, limit_s=0.0,
                                                  error=summary["steps"][i]["error"], checks={}))
            continue
        limit = min(limits[name], left)
        print(f"[gpu-check] {name}: limit {limit:.0f} s", flush=True)
        try:
            data = run_step(name, out, device, quick, limit, log_path)
        except StopRun as stop:
            data = stop.args[0] if stop.args else dict(step=name, status="timeout", error="run stopped")
            summary["steps"][i] = dict(step=name, status=data.get("status"), seconds=data.get("seconds"),
                                       limit_s=limit, error=data.get("error"), checks=data.get("checks"),
                                       file=step_file(out, name).name)
            for j in range(i + 1, len(steps)):
                summary["steps"][j] = dict(step=steps[j], status="skipped", error="the run was stopped (SIGTERM)")
            break
        summary["steps"][i] = dict(step=name, status=data.get("status"), seconds=data.get("seconds"),
                                   limit_s=limit, error=data.get("error"), checks=data.get("checks"),
                                   file=step_file(out, name).name, headline=headline(data))
        summary["total_seconds"] = round(time.perf_counter() - started, 3)
        write_json(out / SUMMARY, summary)
        print(f"[gpu-check] {name}: {data.get('status')} in {data.get('seconds')} s "
              f"{json.dumps(data.get('checks'))}", flush=True)
    summary["finished"] = now_iso()
    summary["total_seconds"] = round(time.perf_counter() - started, 3)
    write_json(out / SUMMARY, summary)
    return summary


# -- step bodies -----------------------------------------------------------------------------
def run_one_step(name: str, out: Path, device: str, quick: bool, limit_s: float) -> int:
    from bench.gpu_check_ranks import end_sessions
    signal.signal(signal.SIGTERM, end_sessions)  # the parent's stop also ends this step's torchrun ranks
    rec = StepRecord(out, name, device, quick, limit_s)
    try:
        if name in ("kernels_equal", "kernel_speed"):
            from bench import gpu_check_kernels as body
        elif name in ("shared_gpu", "tp_engine"):
            from bench import gpu_check_ranks as body
        else:
            body = None
        if name == "collectives":
            collectives_step(rec, out, device, quick)
        else:
            getattr(body, f"{name}_step")(rec, out, device, quick)
    except BaseException as exc:  # noqa: BLE001 - the file records any failure, the parent goes on
        import traceback
        traceback.print_exc()
        rec.finish(f"{type(exc).__name__}: {exc}"[:2000])
        return 1
    rec.finish(rec.data.get("error"))
    return 0


COLLECTIVE_GRID = dict(tp=[2, 4, 3], tokens=[1, 16, 256, 2048, 8192], hidden=[576, 5120],
                       repeats=5, min_repeats=3, warmup=1, budget_s=2.0, compute_repeats=1)
COLLECTIVE_QUICK = dict(tp=[2], tokens=[1, 16], hidden=[576], schemes=["bf16", "int4-static-top1/64"],
                        repeats=2, min_repeats=1, warmup=0, budget_s=0.5, compute_repeats=1)


def collectives_step(rec: StepRecord, out: Path, device: str, quick: bool) -> None:
    """bench.collectives through the launch queue, one job (and one child) per TP size, so each
    finished TP size is saved before the next starts. The grid is that of the CPU table
    bench/results/collectives-loopback-grid.json (TP 2, 3, 4; 1..8192 tokens; 576 and 5120
    features; its 8 schemes) with a shorter per-size budget; TP 3 runs last (5120 does not
    split in 3, so its two-shot rows are skipped there as on the CPU)."""
    import tempfile
    grid = COLLECTIVE_QUICK if quick else COLLECTIVE_GRID
    rec["params"] = dict(grid)
    rec["jobs"], rec["records"] = [], []
    rec["command_template"] = "python -m bench.collectives --tp N --link loopback " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in grid.items() if k != "tp")
    rec.save()
    from bench.gpu_check_ranks import codec_problem, seconds_left
    rec["codec_problem"] = codec_problem(device)
    env = dict(os.environ)
    if rec["codec_problem"] or device == "cpu":
        env["LOWBIT_KERNELS"] = "reference"  # CPU: no torch.compile in the test; GPU: Triton failed
    runs_root = Path(tempfile.mkdtemp(prefix="gpu-check-runs-"))
    env["LOWBIT_RUNS"] = str(runs_root / "runs")
    rec.save()
    for i, tp in enumerate(grid["tp"]):
        # the queue starts each job in its own session: its time limit, not this step's kill,
        # is what stops it, so each job gets what is left less 20 s for each later TP size
        job_limit = seconds_left(rec, 20.0 * (len(grid["tp"]) - i - 1)) - 8.0
        if job_limit < 15:
            rec["jobs"] = rec["jobs"] + [dict(tp=tp, status="skipped", error="step time limit spent")]
            continue
        target = runs_root / f"tp{tp}.json"
        argv = ["--tp", str(tp), "--link", "loopback", "--out", str(target), "--time-limit-s", f"{job_limit:.0f}"]
        for key in ("tokens", "hidden", "schemes"):
            if key in grid:
                argv += [f"--{key}"] + [str(v) for v in grid[key]]
        for key in ("repeats", "min_repeats", "warmup", "budget_s", "compute_repeats"):
            argv += [f"--{key.replace('_', '-')}", str(grid[key])]
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "bench.collectives", *argv], cwd=REPO, env=env,
                                  capture_output=True, text=True, timeout=job_limit + 30)
            rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc, stdout, stderr = None, _text(exc.stdout), _text(exc.stderr) + "\n(bench.collectives timed out)"
        sys.stdout.write(stdout[-20000:])
        sys.stderr.write(stderr[-20000:])
        job = dict(tp=tp, rc=rc, seconds=round(time.perf_counter() - start, 3), time_limit_s=round(job_limit),
                   status="ok" if rc == 0 and target.exists() else "failed")
        data = read_json(target)
        if data:
            rec["records"] = rec["records"] + data.get("records", [])
            runs = (data.get("meta") or {}).get("runs") or []
            job["runs"] = runs
            job["placement"] = _run_placement(runs_root / "runs", runs)
        else:
            job["error"] = (stderr or stdout)[-LOG_TAIL_CHARS:]
        rec["jobs"] = rec["jobs"] + [job]
        rec.save()
    bad = [j["tp"] for j in rec["jobs"] if j["status"] != "ok"]
    rec["codec"] = ("torch reference (LOWBIT_KERNELS=reference)" if "LOWBIT_KERNELS" in env
                    else "kernels.dispatch (auto)")
    rec["checks"] = dict(all_jobs_ok=not bad,
                         every_path_computed_the_sum=all((r.get("rel_error") is None or r["rel_error"] < 0.5)
                                                         for r in rec["records"]))
    rec["error"] = f"collective-bench failed at TP {bad}" if bad else None


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")


def _run_placement(root: Path, runs: list[dict]):
    """The backend/device record (``run.placement``) of the first run's result.json."""
    for run in runs:
        data = read_json(root / run.get("id", "") / "result.json")
        if data and isinstance(data.get("run"), dict):
            return dict(backend=data["run"].get("backend"), placement=data["run"].get("placement"))
    return None


# -- report ----------------------------------------------------------------------------------
def report(out: Path) -> str:
    """A short text report of a run's files: the tables, then one line per step (last, so the
    end of the output, which is what the device tool returns, always holds the verdicts)."""
    out = Path(out)
    s = read_json(out / SUMMARY) or {}
    lines = []
    ks = read_json(step_file(out, "kernel_speed"))
    if ks and ks.get("rows"):
        lines += ["| kernel | scheme | MB moved | µs (median) | GB/s | copy GB/s | of copy |",
                  "|---|---|---|---|---|---|---|"]
        for r in ks["rows"]:
            lines.append(f"| {r['kernel']} | {r['scheme']} | {r['bytes_moved'] / 1e6:.2f} | {r['median_us']:.1f} | "
                         f"{r['gbps']:.0f} | {r['copy_gbps']:.0f} | {100 * r['of_copy']:.0f}% |")
        lines.append(f"target {json.dumps(ks.get('target'))}")
        lines.append(f"fixed cost µs {json.dumps(ks.get('fixed_cost_us'))}")
    tp = read_json(step_file(out, "tp_engine"))
    if tp and tp.get("runs"):
        lines += ["", "| TP | logits max abs diff (tol) | scheme | prefill tok/s | decode tok/s | "
                      "comm share prefill / decode |", "|---|---|---|---|---|---|"]
        for r in tp["runs"]:
            for sc in r.get("schemes", []):
                share = sc.get("comm_share") or {}
                lines.append(f"| {r['tp']} | {r.get('max_abs_logit_diff')} ({r.get('atol')}) | {sc['scheme']} | "
                             f"{_fmt(sc.get('prefill_tokens_per_s'))} | {_fmt(sc.get('decode_tokens_per_s'))} | "
                             f"{_fmt(share.get('prefill'), 3)} / {_fmt(share.get('decode'), 3)} |")
    lines += ["", f"gpu-check {s.get('created')} on {s.get('gpu') or s.get('device')} · torch {s.get('torch')} · "
                  f"triton {s.get('triton')} · CUDA {s.get('cuda')} · driver {s.get('driver')} · "
                  f"{s.get('total_seconds')} s" + (" · QUICK (CPU-safe) mode" if s.get("quick") else "")]
    for st in s.get("steps", []):
        error = f" error: {st.get('error')}" if st.get("error") else ""
        lines.append(f"- {st.get('step')}: {st.get('status')} ({st.get('seconds')} s) "
                     f"checks {json.dumps(st.get('checks'))}{error}")
    return "\n".join(lines)


def _fmt(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


# -- CLI -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="folder for the JSON files")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and short limits (the CPU-safe test mode)")
    ap.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    ap.add_argument("--total-limit-s", type=float, default=TOTAL_LIMIT_S)
    ap.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # child mode: run one step
    ap.add_argument("--limit-s", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--report", type=Path, metavar="OUT", help="print the tables of an earlier run and exit")
    args = ap.parse_args(argv)
    if args.report:
        print(report(args.report))
        return 0
    if args.out is None:
        ap.error("--out is required")
    import torch
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    if device == "cpu" and not args.quick and not args.step:
        ap.error("the full check needs CUDA (13B-shaped layers, 64 MB messages); on the CPU add --quick")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.step:
        return run_one_step(args.step, args.out, device, args.quick, args.limit_s)
    signal.signal(signal.SIGTERM, _raise_stop)  # the shell's timeout: end the step in flight, keep the files
    summary = run_all(args.out, device, args.quick, args.steps, args.total_limit_s)
    print(report(args.out))
    return 0 if all(s.get("status") == "ok" for s in summary["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())

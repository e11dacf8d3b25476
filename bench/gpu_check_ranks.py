# Size: ~450 lines: the two torchrun steps share rank setup, the random-init model and the timers.
"""gpu_check steps that need torchrun ranks: ``shared_gpu`` and ``tp_engine``.

The step (in ``bench.gpu_check``'s child process) starts ``torchrun --standalone`` with this
module as the rank program; rank 0 writes its result to a file the step reads back.

    python3 -m torch.distributed.run --standalone --nproc-per-node 4 -m bench.gpu_check_ranks tp_engine ARGS.json

``shared_gpu``: (1, CUDA only) two ranks initialise NCCL on the same device and all_reduce; the
error NCCL gives (or, unexpectedly, success) is recorded. (2) ``lowbit.comm.dist.init_from_env("auto")``
at TP 2 and 4, which on a one-GPU machine places every rank on cuda:0 under gloo
(``lowbit.comm.placement``): all_reduce (fp32, bf16), all_gather (uint8 payload bytes), all_to_all
with uneven splits and barrier on device tensors, each checked against the value it must give,
and the median time of a 16 MB bf16 all_reduce.

``tp_engine``: a random-init Llama with Llama-2-13B layer shapes (hidden 5120, 40 heads,
intermediate 13824, vocabulary 32000; 4 layers), built identically on every rank from one seed
on its device, sharded with ``lowbit.model.engine.build_tp_model``. (1) fp32 prefill logits of the
sharded model against the unsharded one on rank 0 (``LOGITS_ATOL``; TF32 off). (2) bf16:
static ranges calibrated on random token batches (``lowbit.method.calibrate.run_calibration``), then
prefill and greedy-decode tokens/s for ``bf16`` and ``int4-static-top1/64`` with
``kernels.dispatch`` as the codec (the Triton kernels on CUDA), schemes interleaved round by
round, the slowest rank's median; and the communicator's share of the step time, measured in
a separate pass whose communicator synchronizes the device around every reduce.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.gpu_check import end_process_group
from launch.torchrun import torchrun_args

REPO = Path(__file__).resolve().parent.parent
LOGITS_ATOL = 1e-3  # fp32 logits; the same bound as lowbit.model.tpcheck (sum order only changes last bits)
LLAMA2_13B = dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40,
                  vocab_size=32000, num_hidden_layers=4, max_position_embeddings=4096, rms_norm_eps=1e-5)
TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4,
            vocab_size=256, num_hidden_layers=2, max_position_embeddings=256, rms_norm_eps=1e-5)
TP_FULL = dict(shape=LLAMA2_13B, tps=[2, 4], prompt_tokens=512, new_tokens=32, rounds=3,
               calib_batches=2, calib_tokens=256, schemes=["bf16", "int4-static-top1/64"])
TP_QUICK = dict(shape=TINY, tps=[2], prompt_tokens=16, new_tokens=4, rounds=1, calib_batches=1, calib_tokens=16,
                schemes=["bf16", "int4-static-top1/64"])


# -- launching ---------------------------------------------------------------------------------
SESSIONS: dict[int, subprocess.Popen] = {}  # the torchrun launches in flight, by process group


def end_sessions(signum=None, frame=None) -> None:
    """SIGTERM handler of a step: end the torchrun launches it started, then exit."""
    for proc in list(SESSIONS.values()):
        end_process_group(proc, grace_s=2.0)
    raise SystemExit(128 + (signum or 0))


def torchrun(task: str, nproc: int, args: dict, timeout_s: float, env_extra: dict | None = None) -> dict:
    """Run ``task`` on ``nproc`` torchrun ranks; rank 0's result (or why there is none)."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        args_path = Path(tmp) / "args.json"
        args_path.write_text(json.dumps(dict(args, result=str(result))))
        cmd = torchrun_args(["-m", "bench.gpu_check_ranks", task, str(args_path)], nproc)
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **(env_extra or {}))
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        SESSIONS[proc.pid] = proc  # ended by end_sessions if this step is stopped first
        try:
            output, _ = proc.communicate(timeout=timeout_s)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            end_process_group(proc)
            output, _ = proc.communicate()
            rc = None
        finally:
            SESSIONS.pop(proc.pid, None)
        sys.stdout.write(output[-20000:])
        data = json.loads(result.read_text()) if result.exists() else None
        return dict(rc=rc, timed_out=rc is None, seconds=round(time.perf_counter() - start, 3), result=data,
                    output_tail=None if rc == 0 and data is not None else output[-3000:])


def seconds_left(rec, reserve_s: float = 0.0) -> float:
    """Seconds of the step's limit still left after ``reserve_s`` kept for later launches."""
    limit = float(rec["limit_s"] or 0) or 600.0
    return limit - (time.perf_counter() - rec.start) - 3.0 - reserve_s


def codec_problem(device: str) -> str | None:
    """Why the Triton codec cannot run here (compile or launch error), or None: the TP and
    collective runs then use the torch reference on the same device instead, and say so."""
    if device != "cuda":
        return None
    try:
        from kernels import dispatch
        from lowbit.scheme import QuantSpec
        x = torch.randn(4, 256, device="cuda")
        spec = QuantSpec(4, True, "static")
        lo, hi = x.amin(0), x.amax(0)
        payload = dispatch.quantize_pack(x, spec, torch.tensor([3]), lo, hi)
        dispatch.unpack_dequant_sum(payload.unsqueeze(0), 4, 256, spec, torch.tensor([3]), lo[None], hi[None])
        torch.cuda.synchronize()
        return None
    except Exception as exc:  # noqa: BLE001 - recorded, and the runs fall back
        return f"{type(exc).__name__}: {str(exc)[:1000]}"


# -- shared_gpu --------------------------------------------------------------------------------
def shared_gpu_step(rec, out, device: str, quick: bool) -> None:
    from lowbit.comm.placement import choose_placement
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    rec["gpus"] = gpus
    rec["expected"] = {str(tp): choose_placement("auto", 0, tp, gpus).as_dict() for tp in (2, 4)}
    if device == "cuda":
        probe = torchrun("nccl_probe", 2, {}, timeout_s=max(5.0, min(30.0, seconds_left(rec, 2 * 12.0))),
                         env_extra=dict(NCCL_DEBUG="WARN",
                                        NCCL_SOCKET_IFNAME=os.environ.get("NCCL_SOCKET_IFNAME", "lo")))
        ranks = (probe["result"] or {}).get("ranks") or []
        errors = [r.get("error") for r in ranks if r.get("error")]
        text = " ".join(errors) + " " + (probe.get("output_tail") or "")
        rec["nccl_same_device"] = dict(
            refused=bool(errors), worked=bool(ranks) and all(r.get("ok") for r in ranks),
            duplicate_gpu_message="Duplicate GPU" in text,
            errors=errors[:2], rc=probe["rc"], timed_out=probe["timed_out"], seconds=probe["seconds"],
            output_tail=probe.get("output_tail") if not errors else None)
    else:
        rec["nccl_same_device"] = dict(refused=None, skipped="no CUDA device")
    rec.save()
    rec["gloo_cuda"] = []
    tps = (2,) if quick else (2, 4)
    for i, tp in enumerate(tps):
        run = torchrun("collectives", tp, {}, timeout_s=max(5.0, seconds_left(rec, 12.0 * (len(tps) - i - 1))))
        rec["gloo_cuda"] = rec["gloo_cuda"] + [dict(tp=tp, **run)]
        rec.save()
    runs = rec["gloo_cuda"]
    rec["checks"] = dict(
        gloo_cuda_collectives=all(r["result"] and r["result"].get("all_ok") for r in runs),
        placement_as_expected=all(r["result"] and r["result"]["placement"]["backend"] ==
                                  rec["expected"][str(r["tp"])]["backend"] and
                                  r["result"]["placement"]["device"] == rec["expected"][str(r["tp"])]["device"]
                                  for r in runs),
        nccl_refused_same_device=rec["nccl_same_device"].get("refused"))
    if not rec["checks"]["gloo_cuda_collectives"]:
        rec["error"] = "collectives on shared-GPU ranks failed or gave wrong values"


def _nccl_probe(args: dict) -> None:
    import datetime

    import torch.distributed as dist
    rank = int(os.environ["RANK"])
    entry = dict(rank=rank, ok=False, error=None)
    try:
        torch.cuda.set_device(0)  # every rank on the same device: what NCCL refuses
        dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=20))
        t = torch.ones(4, device="cuda:0")
        dist.all_reduce(t)
        torch.cuda.synchronize()
        entry.update(ok=bool((t == dist.get_world_size()).all()), value=t.tolist())
    except Exception as exc:  # noqa: BLE001 - the error is the finding
        entry["error"] = f"{type(exc).__name__}: {str(exc)[:600]}"
    # no collective is trusted here: every rank writes its own line, rank 0 collects them
    Path(args["result"] + f".rank{rank}").write_text(json.dumps(entry))
    if rank == 0:
        deadline = time.time() + 10
        world = int(os.environ["WORLD_SIZE"])
        while time.time() < deadline and not all(Path(args["result"] + f".rank{r}").exists() for r in range(world)):
            time.sleep(0.1)
        ranks = [json.loads(Path(args["result"] + f".rank{r}").read_text())
                 for r in range(world) if Path(args["result"] + f".rank{r}").exists()]
        Path(args["result"]).write_text(json.dumps(dict(ranks=ranks)))
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - a broken communicator may not tear down cleanly
        pass
    os._exit(0)  # a failed NCCL communicator can block interpreter exit


def _collectives(args: dict) -> None:
    from lowbit.comm.dist import device_for, init_from_env
    group = init_from_env("auto", timeout_s=60)
    dev = device_for(group)
    rank, tp = group.rank, group.world_size
    checks = {}
    ar = group.all_reduce(torch.full((1000,), float(rank + 1), device=dev))
    checks["all_reduce_fp32"] = bool((ar == tp * (tp + 1) / 2).all()) and ar.device == dev
    bf = group.all_reduce(torch.full((3, 5), float(rank + 1), device=dev, dtype=torch.bfloat16))
    checks["all_reduce_bf16"] = bool((bf.float() == tp * (tp + 1) / 2).all()) and bf.dtype == torch.bfloat16
    payload = torch.arange(37, dtype=torch.uint8, device=dev) + rank
    g = group.all_gather(payload)
    want = torch.stack([torch.arange(37, dtype=torch.uint8) + r for r in range(tp)])
    checks["all_gather_uint8"] = bool(torch.equal(g.cpu(), want)) and g.device == dev
    # uneven all_to_all: rank r sends (j + 1) rows of value 100 r + j to rank j
    send_splits = [j + 1 for j in range(tp)]
    send = torch.cat([torch.full((j + 1, 2), 100.0 * rank + j, device=dev) for j in range(tp)])
    recv = group.all_to_all(send, send_splits, [rank + 1] * tp)
    want = torch.cat([torch.full((rank + 1, 2), 100.0 * src + rank) for src in range(tp)])
    checks["all_to_all_uneven"] = bool(torch.equal(recv.cpu(), want)) and recv.device == dev
    group.barrier()
    big = torch.randn(8 << 20, device=dev).to(torch.bfloat16)  # 16 MB
    times = []
    for i in range(6):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        group.barrier()
        t0 = time.perf_counter()
        group.all_reduce(big)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    ok = torch.tensor([all(checks.values())], dtype=torch.int32, device=dev)
    every = group.all_gather(ok).cpu().reshape(-1).tolist()
    if rank == 0:
        Path(args["result"]).write_text(json.dumps(dict(
            placement=group.placement.as_dict(), backend=group.backend, device=str(dev), tp=tp, checks_rank0=checks,
            ranks_ok=every, all_ok=all(every), allreduce_16mb_bf16_median_ms=1e3 * statistics.median(times))))
    group.barrier()


# -- tp_engine ---------------------------------------------------------------------------------
def tp_engine_step(rec, out, device: str, quick: bool) -> None:
    p = TP_QUICK if quick else TP_FULL
    rec["model"] = dict(shape=p["shape"], random_init="LlamaForCausalLM(config), one seed on every rank",
                        prompt_tokens=p["prompt_tokens"], new_tokens=p["new_tokens"], rounds=p["rounds"],
                        schemes=p["schemes"], atol=LOGITS_ATOL,
                        based_on="Llama-2-13B layer dims, fewer layers" if not quick else "tiny")
    rec["runs"] = []
    env = {} if device == "cuda" else dict(LOWBIT_KERNELS="reference")  # CPU: no torch.compile in the test
    rec["codec_problem"] = codec_problem(device)
    if rec["codec_problem"]:
        env["LOWBIT_KERNELS"] = "reference"  # the int4 scheme still runs, on the torch reference
    rec.save()
    for i, tp in enumerate(p["tps"]):
        later = len(p["tps"]) - i - 1
        run = torchrun("tp_engine", tp, dict(p, tp=tp), timeout_s=max(10.0, seconds_left(rec, 25.0 * later)),
                       env_extra=env)
        entry = dict(tp=tp, rc=run["rc"], timed_out=run["timed_out"], seconds=run["seconds"])
        entry.update(run["result"] or dict(error=run["output_tail"]))
        rec["runs"] = rec["runs"] + [entry]
        rec.save()
    runs = rec["runs"]
    rec["checks"] = dict(all_ran=all(r.get("schemes") for r in runs),
                         logits_match=all(r.get("logits_match") for r in runs),
                         weights_identical=all(r.get("weights_identical") for r in runs))
    if not rec["checks"]["all_ran"]:
        rec["error"] = "a TP run failed or timed out"


class _SyncedComm:
    """A communicator wrapper that synchronizes the device before and after every reduce and
    sums the time between (the comm-share pass; the tok/s pass runs without it)."""

    def __init__(self, inner, cuda: bool):
        self.inner, self.cuda = inner, cuda
        self.seconds, self.calls = 0.0, 0

    def reduce(self, partial, site):
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = self.inner.reduce(partial, site)
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def _timed_generate(model, ids, new_tokens: int, cuda: bool, synced: _SyncedComm | None = None) -> dict:
    """Prefill and decode seconds of greedy decoding with a KV cache, the device synchronized at
    each end; with ``synced`` (the model's communicator) also its seconds in each phase."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = model(ids, use_cache=True)
    past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1)
    sync()
    t1 = time.perf_counter()
    prefill_comm = synced.seconds if synced else None
    for _ in range(new_tokens - 1):
        out = model(nxt[:, None], past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1)
    sync()
    t2 = time.perf_counter()
    return dict(prefill=t1 - t0, decode=t2 - t1, prefill_comm=prefill_comm,
                decode_comm=synced.seconds - prefill_comm if synced else None)


@torch.no_grad()
def _tp_engine(args: dict) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from kernels import dispatch
    from lowbit.method.calibrate import run_calibration
    from lowbit.comm.collectives import QuantCommunicator
    from lowbit.comm.dist import device_for, init_from_env
    from lowbit.model.engine import build_tp_model, prefill_logits
    from lowbit.model.models import LoadedModel
    from lowbit.model.tp import set_communicator

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 really fp32 for the logits check
    torch.backends.cudnn.allow_tf32 = False
    group = init_from_env("auto", timeout_s=300)
    dev = device_for(group)
    cuda = dev.type == "cuda"
    rank, tp = group.rank, group.world_size
    config = LlamaConfig(**args["shape"], tie_word_embeddings=False)
    torch.manual_seed(1234)
    if cuda:
        torch.cuda.manual_seed_all(1234)
    t0 = time.perf_counter()
    with torch.device(dev):
        full = LlamaForCausalLM(config).eval()
    init_s = time.perf_counter() - t0
    checksum = torch.tensor([sum(float(p.double().sum()) for p in full.parameters())], dtype=torch.float64,
                            device=dev)
    sums = group.all_gather(checksum).cpu().reshape(-1)
    t0 = time.perf_counter()
    tpm = build_tp_model("gpu-check-random", group, loaded=LoadedModel(full, None, "gpu-check-random", "random", 0.0))
    shard_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(99)
    ids = torch.randint(0, config.vocab_size, (1, args["prompt_tokens"]), generator=gen)
    sharded_logits = prefill_logits(tpm.model, ids)[0]
    result = dict(placement=group.placement.as_dict(), backend=group.backend, device=str(dev), tp=tp,
                  init_seconds=round(init_s, 3), shard_seconds=round(shard_s, 3),
                  weights_identical=bool((sums == sums[0]).all()), atol=LOGITS_ATOL,
                  params_per_rank=sum(p.numel() for p in tpm.model.parameters()))
    if rank == 0:
        full_logits = prefill_logits(full, ids)[0]
        diff = (sharded_logits - full_logits).abs()
        result.update(max_abs_logit_diff=float(diff.max()), max_abs_logit=float(full_logits.abs().max()),
                      rel_logit_diff=float(diff.max() / full_logits.abs().max().clamp_min(1e-30)),
                      argmax_agreement=float((sharded_logits.argmax(-1) == full_logits.argmax(-1)).float().mean()),
                      logits_match=bool(diff.max() <= LOGITS_ATOL), logits_dtype="float32")
    del full, sharded_logits
    if cuda:
        torch.cuda.empty_cache()
    group.barrier()

    tpm.model.to(torch.bfloat16)
    batches = [torch.randint(0, config.vocab_size, (1, args["calib_tokens"]), generator=gen)
               for _ in range(args["calib_batches"])]
    t0 = time.perf_counter()
    calibration = run_calibration(tpm.model, group, batches, gamma=0.01, meta=dict(model="gpu-check-random"))
    result["calibration_seconds"] = round(time.perf_counter() - t0, 3)
    comms = {s: QuantCommunicator(group, s, calibration, record=True, codec=dispatch.Codec()) for s in args["schemes"]}
    timings = {s: dict(prefill=[], decode=[], prefill_comm=[], decode_comm=[], prefill_synced=[], decode_synced=[])
               for s in comms}
    for round_ in range(args["rounds"] + 1):  # round 0 warms every scheme up (and compiles the kernels)
        for scheme, comm in comms.items():
            set_communicator(tpm.model, comm)
            group.barrier()
            plain = _timed_generate(tpm.model, ids, args["new_tokens"], cuda)
            synced = _SyncedComm(comm, cuda)
            set_communicator(tpm.model, synced)
            group.barrier()
            timed = _timed_generate(tpm.model, ids, args["new_tokens"], cuda, synced)
            if round_ == 0:
                continue
            t = timings[scheme]
            t["prefill"].append(plain["prefill"])
            t["decode"].append(plain["decode"])
            t["prefill_synced"].append(timed["prefill"])
            t["decode_synced"].append(timed["decode"])
            t["prefill_comm"].append(timed["prefill_comm"])
            t["decode_comm"].append(timed["decode_comm"])
        for comm in comms.values():
            if round_ < args["rounds"]:
                comm.calls.clear()  # the last round's calls stay for the bits per value
    keys = ("prefill", "decode", "prefill_synced", "decode_synced", "prefill_comm", "decode_comm")
    local = torch.tensor([[statistics.median(timings[s][k]) for k in keys] for s in comms], dtype=torch.float64,
                         device=dev)
    gathered = group.all_gather(local).cpu()  # [tp, schemes, keys]
    schemes = []
    for i, scheme in enumerate(comms):
        m = {k: gathered[:, i, j] for j, k in enumerate(keys)}
        prefill_s, decode_s = float(m["prefill"].max()), float(m["decode"].max())  # the slowest rank sets the pace
        calls = comms[scheme].calls
        values = sum(c.tokens * c.hidden for c in calls)
        codec_backend = ", ".join(sorted(set(comms[scheme].paths.by_site().values())))  # the paths the calls took
        schemes.append(dict(
            scheme=scheme, codec="torch all_reduce" if scheme == "bf16" else f"kernels.dispatch -> {codec_backend}",
            prefill_tokens=args["prompt_tokens"], decode_tokens=args["new_tokens"] - 1,
            prefill_tokens_per_s=args["prompt_tokens"] / prefill_s,
            decode_tokens_per_s=(args["new_tokens"] - 1) / decode_s if decode_s > 0 else None,
            prefill_ms=1e3 * prefill_s, decode_ms_per_token=1e3 * decode_s / max(1, args["new_tokens"] - 1),
            comm_share=dict(prefill=float((m["prefill_comm"] / m["prefill_synced"]).max()),
                            decode=float((m["decode_comm"] / m["decode_synced"]).max())),
            comm_share_per_rank=dict(prefill=[round(float(v), 4) for v in m["prefill_comm"] / m["prefill_synced"]],
                                     decode=[round(float(v), 4) for v in m["decode_comm"] / m["decode_synced"]]),
            bits_per_value=8.0 * sum(c.bytes_sent for c in calls) / values if values else None,
            reduce_calls=len(calls)))
    base = schemes[0]
    for s in schemes:
        s["prefill_speedup_vs_first"] = s["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]
        s["decode_speedup_vs_first"] = (s["decode_tokens_per_s"] / base["decode_tokens_per_s"]
                                        if s["decode_tokens_per_s"] and base["decode_tokens_per_s"] else None)
    result["schemes"] = schemes
    result["note"] = ("ranks share one GPU (gloo, collectives through host memory): tok/s are of that setup, "
                      "not of NCCL on separate GPUs") if group.placement.shared_gpu else None
    if rank == 0:
        Path(args["result"]).write_text(json.dumps(result))
    group.barrier()


TASKS = dict(nccl_probe=_nccl_probe, collectives=_collectives, tp_engine=_tp_engine)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in TASKS:
        print(f"usage: torchrun ... -m bench.gpu_check_ranks {{{','.join(TASKS)}}} ARGS.json", file=sys.stderr)
        return 2
    import torch.distributed as dist
    try:
        TASKS[argv[0]](json.loads(Path(argv[1]).read_text()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The pre-flight audit (lowbit.method.audit, launch.kinds.audit, python -m lowbit audit): on the
stress model it flags exactly the site made to overflow fp16 and the site made tiny, judges
formats against the user's thresholds, reports a measured fix, and refuses bad input by field.

    .venv/bin/python -m pytest tests/test_audit.py -q -p no:randomly

Expectations come from the stress model's construction (lowbit.model.stress): at
``overflow_site`` every rank's partial exceeds FP16_MAX, at ``tiny_site`` every value stays under
TINY_BOUND, every other site's largest partial lies between the two. The presets' numerics are
not used for a number here (they change as the shipping codecs are reproduced); the failure modes
come from ``RangeCast`` below, a test-only input cast (a plug-in, as tests/test_plugins.py writes
one) with both of fp16's cliffs at the stress model's bounds: past 65504 a value becomes inf,
under TINY_BOUND it flushes to 0.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
# resolved here, once: transformers imports these lazily, and two thread-ranks resolving them at once fail
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

from launch.audit_cli import default_formats, flag_of
from launch.spec import JobSpec, SpecError
from lowbit.casts.base import CASTS, Cast
from lowbit.comm.dist import ThreadWorld
from lowbit.method.audit import (BASELINE, Thresholds, audit, candidates, keep_exact_variant, native_variant,
                                 site_flags, verdict)
from lowbit.method.audit_report import markdown
from lowbit.method.audit_sites import ALL_COUNTERS, COUNTERS
from lowbit.model import engine
from lowbit.model.models import load_model
from lowbit.model.stress import TINY_BOUND, stress_spec
from lowbit.scheme import PRESETS

REPO = Path(__file__).resolve().parents[1]
STRESS = "stress-tiny"
TOKEN = "-crange16"


@dataclass(frozen=True)
class RangeCast(Cast):
    """fp16's two cliffs at the stress model's bounds: |x| > 65504 -> inf, |x| < TINY_BOUND -> 0."""

    name = "range16-test"
    syntax = TOKEN
    help = "test only: fp16 overflow to inf and a flush to 0 under TINY_BOUND"

    @classmethod
    def parse(cls, text, pos):
        return (cls(), pos + len(TOKEN)) if re.match(re.escape(TOKEN) + r"(?=[-@;]|$)", text[pos:]) else None

    @property
    def token(self):
        return TOKEN

    def apply(self, x):
        y = x.to(torch.float16).to(torch.float32)  # past 65504: inf, as the fp16 cast
        return torch.where(x.abs() < TINY_BOUND, torch.zeros_like(y), y)


CAST_FORMAT = "int8-group32-sfp32" + TOKEN   # int8 with fp32 scales: nothing but the cast can break it
PLAIN_FORMAT = "int8-group32-sfp32"
# sizes small enough for a fast test: 4 chunks of 32 tokens held out, 2 of them for the sites
PARAMS = dict(model=STRESS, eval_source="wikipedia", eval_chunks=4, site_chunks=2, seq_len=32, batch_size=2,
              degrades_kl=0.05)  # int8 on a 64-wide random model: KL ~1e-3, far under 0.05


@pytest.fixture(scope="module")
def range_cast():
    CASTS.register(RangeCast)
    yield
    CASTS.unregister(RangeCast.name)


_LOAD_LOCK = threading.Lock()


def _one_load_at_a_time(monkeypatch_target=engine):
    """transformers' from_pretrained builds on a process-wide meta-device context and imports
    lazily, so two thread-ranks loading a local folder at once break each other; real ranks are
    processes. The fake group's ranks load one after the other instead."""
    real = monkeypatch_target.load_model

    def locked(*args, **kwargs):
        with _LOAD_LOCK:
            return real(*args, **kwargs)
    return locked


def run_audit(params: dict, tp: int = 2) -> dict:
    real = engine.load_model
    engine.load_model = _one_load_at_a_time()
    try:
        reports = ThreadWorld(tp).run(lambda group: audit(group, dict(PARAMS, **params)))
    finally:
        engine.load_model = real
    assert all(r is None for r in reports[1:])
    return reports[0]


@pytest.fixture(scope="module")
def stress_report(range_cast):
    return run_audit(dict(formats=[CAST_FORMAT, PLAIN_FORMAT]))


def site_rows(report: dict, fmt: str, role: str = "format") -> dict[str, dict]:
    return {f"L{r['layer']}.{r['module']}": r for r in report["site_rows"] if r["format"] == fmt and r["role"] == role}


def record(report: dict, fmt: str) -> dict:
    return next(f for f in report["formats"] if f["format"] == fmt)


# -- the stress model: exactly the two sites -----------------------------------------------------
def test_the_audit_flags_exactly_the_overflow_and_the_tiny_site(stress_report):
    spec = stress_spec(STRESS)
    overflow, tiny = str(spec.overflow_site), str(spec.tiny_site)
    rows = site_rows(stress_report, CAST_FORMAT)
    assert set(rows) == {"L0.o_proj", "L0.down_proj", "L1.o_proj", "L1.down_proj"}
    assert record(stress_report, CAST_FORMAT)["flagged_sites"] == [overflow, tiny]
    # every rank's partial there exceeds FP16_MAX: the cast makes values inf, counted as beyond range;
    # lowbit's quantizer sends a non-finite input as the zero code, so those groups lose their norm
    assert rows[overflow]["beyond_range_in"] > 0 and rows[overflow]["attenuated_groups"] > 0
    assert rows[overflow]["nonfinite_out"] == 0
    # every value there is under TINY_BOUND: the cast flushes all, so every group decodes to 0
    assert rows[tiny]["groups"] > 0 and rows[tiny]["underflowed_groups"] == rows[tiny]["groups"]
    assert rows[tiny]["beyond_range_in"] == 0 and rows[tiny]["nonfinite_out"] == 0
    for name, row in rows.items():
        if name not in (overflow, tiny):
            assert site_flags(row, Thresholds(**stress_report["thresholds"])) == [], (name, row)
            assert row["beyond_range_in"] == 0 and row["nonfinite_out"] == 0 and row["underflowed_groups"] == 0
    # a two-shot scheme's second-leg counters are None for this one-leg format, never 0
    assert all(rows[overflow][f"leg2_{c}"] is None for c in COUNTERS)


def test_without_the_cast_no_site_is_flagged_and_the_format_is_safe(stress_report):
    rec = record(stress_report, PLAIN_FORMAT)
    assert rec["verdict"] == "safe" and rec["flagged_sites"] == [] and rec["kl"] < PARAMS["degrades_kl"]
    # int8 of a group's absmax / 127: the sum's SQNR is about 6 dB per bit; 30 dB is a loose floor
    assert all(r["sqnr_db"] > 30 for r in site_rows(stress_report, PLAIN_FORMAT).values())
    assert record(stress_report, BASELINE)["verdict"] == "safe"


def test_a_format_that_loses_a_site_is_judged_by_the_thresholds_and_its_fix_is_measured(stress_report):
    rec = record(stress_report, CAST_FORMAT)
    site_rows_ = list(site_rows(stress_report, CAST_FORMAT).values())
    assert rec["verdict"] == "degrades" and rec["kl"] > PARAMS["degrades_kl"]
    assert any(r.startswith("L0.down_proj: ") and "beyond the format's range" in r for r in rec["reasons"])
    # the same measurements under a stricter user: KL over breaks_kl breaks it
    assert verdict(dict(kl=rec["kl"]), site_rows_, Thresholds(breaks_kl=rec["kl"] / 2))[0] == "breaks"
    # cheapest first: the format without its cast costs the same bits, so it is tried first and is safe
    fix = rec["fix"]
    assert fix["kind"] == "native path" and fix["text"] == PLAIN_FORMAT and fix["verdict"] == "safe"
    tried = [t for t in stress_report["fixes"] if t["format"] == CAST_FORMAT]
    assert len(tried) == 1  # the search stops at the first safe fix
    assert fix["kl"] == record(stress_report, PLAIN_FORMAT)["kl"]  # measured, in the same run as the format
    assert not any(t["format"] == PLAIN_FORMAT for t in stress_report["fixes"])  # a safe format is not fixed


def test_keeping_the_flagged_sites_exact_is_a_candidate_and_measured_safe(range_cast):
    spec = stress_spec(STRESS)
    flagged = [str(spec.overflow_site), str(spec.tiny_site)]
    all_sites = [(0, "o_proj"), (0, "down_proj"), (1, "o_proj"), (1, "down_proj")]
    kinds = [c["kind"] for c in candidates(CAST_FORMAT, flagged, all_sites, [], 64, 2, 64, 1 << 20)]
    assert kinds == ["native path", "sites exact", "size gate"]  # native: same bits as the format, first
    exact = keep_exact_variant(CAST_FORMAT, flagged)
    assert exact == f"{CAST_FORMAT};L0.down_proj=bf16;L1.o_proj=bf16"
    report = run_audit(dict(formats=[exact], eval_chunks=2, site_chunks=1))
    rec = record(report, exact)
    assert rec["verdict"] == "safe" and rec["flagged_sites"] == [], rec["reasons"]
    assert native_variant(PLAIN_FORMAT) is None  # nothing to take away


def test_a_format_already_judged_safe_at_no_more_bits_comes_before_wider_ones():
    sites = [(0, "o_proj"), (0, "down_proj"), (1, "o_proj"), (1, "down_proj")]
    int6, int8, int4 = "int6-group32-sfp16", "int8-group32-sfp16", "int4-group32-sfp16"
    found = candidates(int6, [], sites, [int8], 64, 2, 64, 1 << 20, safe=[int4, int8, BASELINE])
    # int4 (fewer bits, safe here) first: switching costs no measurement; int8 is only "wider"
    assert [(c["kind"], c["text"]) for c in found] == [("safe format", int4), ("wider format", int8),
                                                       ("size gate", found[-1]["text"])]
    assert found[0]["predicted_bits"] < found[1]["predicted_bits"]


# -- verdicts against thresholds -----------------------------------------------------------------
def _row(**counts) -> dict:
    row = dict(layer=3, module="down_proj", sqnr_db=40.0, two_shot=False, **{c: 0 for c in ALL_COUNTERS})
    row.update(counts)
    return row


@pytest.mark.parametrize("kl, rows, th, expected", [
    (0.001, [_row()], Thresholds(), "safe"),
    (0.02, [_row()], Thresholds(), "degrades"),                      # KL over 0.01
    (0.02, [_row()], Thresholds(degrades_kl=0.05), "safe"),          # the user's threshold moves it
    (2.0, [_row()], Thresholds(), "breaks"),                         # KL over 1
    (2.0, [_row()], Thresholds(breaks_kl=5.0), "degrades"),
    (float("nan"), [_row()], Thresholds(), "breaks"),                # no KL: non-finite distribution
    (0.001, [_row(nonfinite_out=1)], Thresholds(), "breaks"),
    (0.001, [_row(beyond_range_in=3)], Thresholds(), "degrades"),
    (0.001, [_row(sqnr_db=9.0)], Thresholds(), "degrades"),
    (0.001, [_row(sqnr_db=9.0)], Thresholds(min_sqnr_db=5.0), "safe"),
    (0.001, [_row(attenuated_groups=1, groups=100)], Thresholds(), "degrades"),          # any lost group
    (0.001, [_row(attenuated_groups=1, groups=100)], Thresholds(max_group_loss=0.02), "safe"),  # 1% <= 2%
    (0.001, [_row(underflowed_groups=3, groups=100)], Thresholds(max_group_loss=0.02), "degrades"),
])
def test_verdicts_follow_the_users_thresholds(kl, rows, th, expected):
    got, reasons = verdict(dict(kl=kl), rows, th)
    assert got == expected
    assert (reasons == []) == (expected == "safe")


def test_thresholds_are_checked_by_field():
    assert Thresholds.problems(dict(breaks_kl=0.5, degrades_kl=0.1)) == []
    problems = dict(Thresholds.problems(dict(degrades_kl=2.0, breaks_kl=1.0)))
    assert "degrades_kl <= breaks_kl" in problems["params.degrades_kl"]
    problems = dict(Thresholds.problems(dict(max_group_loss=1.5, min_sqnr_db=float("inf"))))
    assert "between 0 and 1" in problems["params.max_group_loss"] and "finite" in problems["params.min_sqnr_db"]


# -- the report: JSON and Markdown ---------------------------------------------------------------
def test_the_report_is_plain_json_and_its_markdown_names_every_format(stress_report):
    text = json.dumps(stress_report, allow_nan=False)  # no NaN/inf: a strict JSON reader takes it
    again = json.loads(text)
    for key in ("model", "tp", "hidden", "sites", "thresholds", "formats", "site_rows", "fixes", "eval_tokens",
                "reference_ppl", "model_findings"):
        assert key in again, key
    assert (again["model"], again["tp"], again["hidden"], again["sites"]) == (STRESS, 2, 64, 4)
    assert again["eval_tokens"] == PARAMS["eval_chunks"] * PARAMS["seq_len"]
    assert [f["format"] for f in again["formats"]] == [BASELINE, CAST_FORMAT, PLAIN_FORMAT]
    md = markdown(again)
    assert md.startswith(f"# Pre-flight audit: `{STRESS}` at TP 2")
    verdict_lines = [line for line in md.splitlines() if line.startswith("| `")]
    assert f"| `{CAST_FORMAT}` | **degrades** |" in md and f"| `{PLAIN_FORMAT}` | **safe** |" in md
    assert f"native path: `{PLAIN_FORMAT}`" in md
    flagged = [line for line in verdict_lines if line.startswith(f"| `{CAST_FORMAT}` | L")]
    assert [line.split(" | ")[1] for line in flagged] == ["L0.down_proj", "L1.o_proj"]
    assert f"python -m lowbit audit --model {STRESS} --tp 2 --formats {CAST_FORMAT},{PLAIN_FORMAT}" in md


# -- bad input -----------------------------------------------------------------------------------
def audit_job(**overrides) -> dict:
    spec = dict(kind="audit", model=STRESS, tp=2, schemes=["mxfp8"], eval_data="wikipedia", eval_tokens=128,
                params=dict(seq_len=32, site_tokens=64))
    spec.update(overrides)
    return spec


def problems_of(spec: dict) -> dict[str, str]:
    with pytest.raises(SpecError) as exc:
        JobSpec.from_dict(spec)
    return dict(exc.value.problems)


def test_an_unknown_format_names_the_allowed_ones():
    problems = problems_of(audit_job(schemes=["mxfp8", "quickreduce-int5"]))
    assert "schemes[1]" in problems and flag_of("schemes[1]") == "--formats"
    for preset in ("mxfp4", "quickreduce-int4", "flashinfer-fp8", "trtllm-fp8"):
        assert preset in problems["schemes[1]"]


def test_every_preset_at_tp3_is_the_runnable_ones_and_the_rest_are_named():
    """QuickReduce, FlashInfer and TensorRT-LLM refuse TP 3 (their kernels' world sizes): the
    default formats of an audit there leave them out and say why, and the spec they make is valid."""
    formats, left_out = default_formats("smollm2-135m", 3)
    assert formats and set(formats).isdisjoint(left_out) and set(formats) | set(left_out) == set(PRESETS)
    for name in ("quickreduce-int4", "flashinfer-fp8", "trtllm-fp8"):
        assert name in left_out and "tp: 3 not allowed" in left_out[name]
    assert "mxfp8" in formats
    JobSpec.from_dict(audit_job(model="smollm2-135m", tp=3, schemes=formats))  # refused specs raise SpecError
    formats2, left_out2 = default_formats("smollm2-135m", 2)
    assert "quickreduce-int4" in formats2 and "quickreduce-int4" not in left_out2


def test_a_model_path_that_does_not_exist_names_the_field(tmp_path):
    missing = str(tmp_path / "no-such-model")
    problems = problems_of(audit_job(model=missing))
    assert "model" in problems and "is not an existing directory" in problems["model"]
    assert "smollm2-135m" in problems["model"]  # the allowed names
    assert flag_of("model") == "--model"


def test_bad_params_are_refused_by_field():
    problems = problems_of(audit_job(params=dict(seq_len=32, site_tokens=64, breaks_kl=-1, bogus=1)))
    assert "params.breaks_kl" in problems and "allowed:" in problems["params.bogus"]
    problems = problems_of(audit_job(schemes=[]))
    assert "schemes" in problems


def test_cli_refuses_an_unknown_format_before_starting_ranks():
    proc = subprocess.run([sys.executable, "-m", "lowbit", "audit", "--model", STRESS, "--tp", "2",
                           "--formats", "mxfp8,int4-grop32"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--formats (schemes[1])" in proc.stderr and "'int4-grop32'" in proc.stderr


def test_cli_names_the_model_flag_for_a_folder_that_does_not_exist(tmp_path):
    missing = tmp_path / "no-such-model"
    proc = subprocess.run([sys.executable, "-m", "lowbit", "audit", "--model", str(missing), "--tp", "2",
                           "--formats", "mxfp8"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"error: --model (model): '{missing}' is not an existing directory" in proc.stderr


def nan_weight_folder(tmp_path: Path) -> tuple[Path, str]:
    """tiny-llama saved as a local HF folder with one NaN in L0's o_proj weight."""
    loaded = load_model("tiny-llama")
    name = "model.layers.0.self_attn.o_proj.weight"
    with torch.no_grad():
        loaded.model.get_parameter(name)[0, 0] = float("nan")
    folder = tmp_path / "nan-llama"
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder, name


def test_a_model_with_non_finite_weights_is_reported_not_crashed(tmp_path):
    folder, name = nan_weight_folder(tmp_path)
    JobSpec.from_dict(audit_job(model=str(folder)))  # a local HF folder is a model the spec takes
    report = run_audit(dict(model=str(folder), formats=[PLAIN_FORMAT, "mxfp8"]))
    (finding,) = report["model_findings"]
    assert finding["finding"] == "non-finite weights"
    # o_proj is row-parallel: column 0 of its input lies in rank 0's shard
    assert finding["tensors"] == [dict(tensor=name, per_rank=[1, 0])]
    assert [f["verdict"] for f in report["formats"]] == ["not audited"] * 3
    assert name in markdown(report) and json.loads(json.dumps(report, allow_nan=False)) == report


def test_a_local_hf_folder_is_audited_like_a_named_model(tmp_path):
    loaded = load_model("tiny-llama")
    folder = tmp_path / "llama-folder"
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    report = run_audit(dict(model=str(folder), formats=[PLAIN_FORMAT], eval_chunks=2, site_chunks=1))
    assert report["model_findings"] == [] and report["sites"] == 4 and report["hidden"] == 64
    assert record(report, PLAIN_FORMAT)["verdict"] == "safe"
    assert math.isfinite(report["reference_ppl"])


# -- the real command line through torchrun -------------------------------------------------------
@pytest.mark.slow
def test_cli_audits_the_stress_model_at_tp2_through_torchrun(tmp_path):
    env = dict(**__import__("os").environ, LOWBIT_RUNS=str(tmp_path / "runs"))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "lowbit", "audit", "--model", STRESS, "--tp", "2",
                           "--formats", f"{PLAIN_FORMAT},mxfp8", "--eval-tokens", "128", "--site-tokens", "64",
                           "--seq-len", "32", "--batch-size", "2", "--degrades-kl", "0.05", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / f"audit-{STRESS}-tp2.json").read_text())
    md = (out / f"audit-{STRESS}-tp2.md").read_text()
    assert report["tp"] == 2 and report["eval_tokens"] == 128 and report["site_tokens"] == 64
    assert [f["format"] for f in report["formats"]] == [BASELINE, PLAIN_FORMAT, "mxfp8"]
    assert md == markdown(report) and md in proc.stdout
    # every site of every format measured, on both ranks' messages (2 ranks x groups per message)
    rows = [r for r in report["site_rows"] if r["role"] == "format"]
    assert len(rows) == 3 * 4 and all(r["calls"] > 0 for r in rows)
    assert all(r["groups"] % 2 == 0 for r in rows if r["format"] == PLAIN_FORMAT)
    assert record(report, PLAIN_FORMAT)["verdict"] == "safe"
    assert all(r["beyond_range_in"] == 0 for r in rows if r["format"] == PLAIN_FORMAT)

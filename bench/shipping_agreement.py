"""How close are lowbit's own int4 rendering and the ``quickreduce-int4`` preset to QuickReduce's INT4 codec? (issue 26)

    python -m bench.shipping_agreement            # writes bench/results/shipping-agreement.json

The reference is the independent numpy re-derivation in ``tests/shipping_reference.py``
(``qr_roundtrip``, ``quickreduce``: vLLM csrc/quickreduce, fp16 cast on, IEEE fp16 overflow as on
gfx950). "lowbit" is lowbit's own rendering, what the preset expanded to before issue 26
(``LOWBIT_OWN``: contiguous groups of 32, lowbit's absmax rule, fp16 scales); "preset" is today's
``quickreduce-int4`` (the emulation: ``lowbit.scales.qr``, ``lowbit.groups.ilv``,
``lowbit.comm.recipes``). Each goes parse -> ``lowbit.quant.quantize`` / ``dequantize`` for one
message, and its ``QuantCommunicator`` on a threaded TP-2 group. On one seeded (64, 576) bf16
tensor (``torch.randn``, seed 0):

1. codec round trip: the fraction of decoded values that are equal, and each one's relative L2
   error against the input;
2. attribution: the same with the grouping swapped (lowbit's rule on QuickReduce's interleaved
   groups, QuickReduce's rule on lowbit's contiguous groups), so grouping and scale rule are
   measured apart;
3. the edge inputs of the issue (70144, 1e30 in an otherwise N(0,1) row, randn * 1e-5);
4. the TP-2 all-reduce of two seeded partials (randn, and randn * 1e-5), against the exact sum;
5. the re-derived QuickReduce alone on those edge inputs, per hardware path (gfx950's IEEE fp16
   overflow, gfx942's FP16_OVFL saturation, the native bf16 kernels).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from bench._meta import finish_meta, start_meta
from lowbit.comm.collectives import QuantCommunicator
from lowbit.comm.dist import ThreadWorld
from lowbit.quant import dequantize, quantize
from lowbit.scheme import parse_scheme
from lowbit.site import Site
from tests import shipping_reference as reference  # the independent re-derivation (phase 1 of issue 26)

PRESET = "quickreduce-int4"
LOWBIT_OWN = "int4-group32-sfp16@twoshot+int4-group32-sfp16"  # the preset's expansion before issue 26
SHAPE = (64, 576)


def seeded_bf16(seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*SHAPE, generator=g) * scale).bfloat16().float()


def lowbit_roundtrip(x: np.ndarray, scheme: str = LOWBIT_OWN) -> np.ndarray:
    spec = parse_scheme(scheme).quant
    res = quantize(torch.from_numpy(x.astype(np.float32)), spec)
    return dequantize(res.codes, spec, res.scales).double().numpy()


def quickreduce_roundtrip(x: np.ndarray) -> np.ndarray:
    return reference.qr_roundtrip(x, "int4", cast_bf16_to_fp16=True, overflow="inf")


def compare(a: np.ndarray, b: np.ndarray, x: np.ndarray) -> dict:
    finite = np.isfinite(x)
    return dict(agreement=float(np.mean(a == b)),
                rel_l2_lowbit=float(np.linalg.norm((a - x)[finite]) / np.linalg.norm(x[finite])),
                rel_l2_quickreduce=float(np.linalg.norm((b - x)[finite]) / np.linalg.norm(x[finite])))


def attribution(x: np.ndarray) -> dict:
    """Agreement with each factor isolated: groups permuted so that one rule sees the other's groups."""
    perm = reference.qr_groups(x.size).ravel()             # QuickReduce's groups, one after another

    def on_qr_groups(fn):                                   # contiguous 32s of the permuted tensor = QR groups
        out = np.empty(x.size)
        out[perm] = fn(x.ravel()[perm].reshape(x.shape)).ravel()
        return out.reshape(x.shape)

    def on_contiguous_groups(fn):                           # QR groups filled with contiguous 32s
        y = np.empty(x.size)
        y[perm] = x.ravel()
        return fn(y.reshape(x.shape)).ravel()[perm].reshape(x.shape)

    qr_rule_qr_groups = quickreduce_roundtrip(x)
    lowbit_rule_contiguous = lowbit_roundtrip(x)
    lowbit_rule_qr_groups = on_qr_groups(lowbit_roundtrip)
    qr_rule_contiguous = on_contiguous_groups(quickreduce_roundtrip)
    return dict(
        preset=compare(lowbit_roundtrip(x, PRESET), qr_rule_qr_groups, x),
        as_shipped=compare(lowbit_rule_contiguous, qr_rule_qr_groups, x),
        same_groups_interleaved=compare(lowbit_rule_qr_groups, qr_rule_qr_groups, x),
        same_groups_contiguous=compare(lowbit_rule_contiguous, qr_rule_contiguous, x),
        same_rule_lowbit=compare(lowbit_rule_contiguous, lowbit_rule_qr_groups, x),
        same_rule_quickreduce=compare(qr_rule_contiguous, qr_rule_qr_groups, x),
    )


def edge_cases() -> dict:
    out = {}
    for label, value in (("70144", 70144.0), ("1e30", 1e30)):
        x = seeded_bf16(1).numpy().astype(np.float64)
        x[3, 10] = float(torch.tensor(value).bfloat16())
        low, qr, pre = lowbit_roundtrip(x), quickreduce_roundtrip(x), lowbit_roundtrip(x, PRESET)
        out[label] = dict(input=x[3, 10], lowbit_output=float(low[3, 10]), quickreduce_output=float(qr[3, 10]),
                          preset_output=float(pre[3, 10]), preset_nonfinite=int((~np.isfinite(pre)).sum()),
                          lowbit_nonfinite=int((~np.isfinite(low)).sum()),
                          quickreduce_nonfinite=int((~np.isfinite(qr)).sum()))
    x = seeded_bf16(2, scale=1e-5).numpy().astype(np.float64)
    low, qr, pre = lowbit_roundtrip(x), quickreduce_roundtrip(x), lowbit_roundtrip(x, PRESET)
    out["randn_1e-5"] = dict(compare(low, qr, x), lowbit_nonfinite=int((~np.isfinite(low)).sum()),
                             preset_rel_l2=compare(pre, qr, x)["rel_l2_lowbit"],
                             preset_nonfinite=int((~np.isfinite(pre)).sum()),
                             quickreduce_nonfinite=int((~np.isfinite(qr)).sum()))
    return out


def two_shot(seeds=(3, 4), scale: float = 1.0, scheme: str = PRESET) -> dict:
    partials = [seeded_bf16(s, scale) for s in seeds]
    exact = (partials[0].double() + partials[1].double()).numpy()

    def body(group):
        comm = QuantCommunicator(group, scheme)
        return comm.reduce(partials[group.rank].clone(), Site(0, "o_proj"))
    lowbit_out = ThreadWorld(len(seeds)).run(body)[0].double().numpy()
    qr_out = reference.quickreduce([p.numpy() for p in partials], "int4")[0][0]
    finite = np.isfinite(exact)
    return dict(tp=len(seeds), scale=scale, scheme=scheme, agreement=float(np.mean(lowbit_out == qr_out)),
                rel_l2_lowbit=float(np.linalg.norm(lowbit_out - exact) / np.linalg.norm(exact[finite])),
                rel_l2_quickreduce=float(np.linalg.norm(qr_out - exact) / np.linalg.norm(exact[finite])))


QR_PATHS = {"gfx950, fp16 cast": dict(cast_bf16_to_fp16=True, overflow="inf"),
            "gfx942, fp16 cast (FP16_OVFL)": dict(cast_bf16_to_fp16=True, overflow="saturate"),
            "native bf16": dict(cast_bf16_to_fp16=False, overflow="inf")}


def quickreduce_paths(seeds=(5, 6)) -> list[dict]:
    """The re-derived QuickReduce TP-2 all-reduce on the issue's edge inputs, per hardware path."""
    rows = []
    for label, scale, big in (("randn, one 70144", 1.0, 70144.0), ("randn x 1e-5", 1e-5, None)):
        partials = [seeded_bf16(s, scale).numpy().astype(np.float64) for s in seeds]
        if big is not None:
            partials[0][3, 10] = big
        exact = partials[0] + partials[1]
        keep = np.ones(exact.shape, dtype=bool)
        if big is not None:
            keep[3, 10] = False                              # the planted value is reported apart
        for code in ("int4", "int8"):
            for path, kw in QR_PATHS.items():
                out = reference.quickreduce(partials, code, **kw)[0][0]
                counted = keep & np.isfinite(out)            # errors and norms over the other finite outputs
                ref = np.linalg.norm(exact[counted])
                rows.append(dict(input=label, code=code, path=path, nonfinite=int((~np.isfinite(out)).sum()),
                                 planted_output=None if big is None else float(out[3, 10]),
                                 rel_l2=float(np.linalg.norm((out - exact)[counted]) / ref),
                                 norm_kept=float(np.linalg.norm(out[counted]) / ref)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/shipping-agreement.json")
    args = parser.parse_args(argv)
    meta = start_meta("bench.shipping_agreement", sys.argv[1:] if argv is None else argv)
    x = seeded_bf16(0).numpy().astype(np.float64)
    result = dict(preset=PRESET, expansion=str(parse_scheme(PRESET)), shape=list(SHAPE),
                  codec=attribution(x), edge_cases=edge_cases(),
                  all_reduce=dict(randn_own=two_shot(scheme=LOWBIT_OWN), randn_1e_5_own=two_shot(scale=1e-5, scheme=LOWBIT_OWN),
                                  randn=two_shot(), randn_1e_5=two_shot(scale=1e-5)),
                  quickreduce_paths=quickreduce_paths())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=finish_meta(meta), **result), indent=2))
    codec = result["codec"]
    for name, row in codec.items():
        print(f"{name:26s} agreement {row['agreement']:.3f}  rel L2 lowbit {row['rel_l2_lowbit']:.4f}  "
              f"quickreduce {row['rel_l2_quickreduce']:.4f}")
    for name, row in result["edge_cases"].items():
        print(name, row)
    for row in result["quickreduce_paths"]:
        print("quickreduce", row)
    for name, row in result["all_reduce"].items():
        print("all-reduce", name, row)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Bits per value of every named preset, measured from the bytes of one encoded message.

    .venv/bin/python -m bench.formats --out bench/results/formats-bits.json

For each preset in ``lowbit.scheme.PRESETS``: encode a seeded ``tokens x hidden`` message with
``lowbit.wire.payload.encode`` and count its bytes (``measured_bits`` = 8 x bytes / values), next
to the accounting's formula for the same format (``lowbit.wire.accounting.preset_rows``); the two
must agree, or the script fails. A preset refused at this hidden size (none today: FlashInfer's and
TensorRT-LLM's 256 / 496-value groups are flat groups, ``lowbit.groups.flat``, which fit any size)
keeps its refusal and is measured at the size ``ELSEWHERE`` lists for it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from bench._meta import finish_meta, start_meta
from lowbit.scheme import PRESETS, SchemeError, parse_scheme
from lowbit.wire import accounting
from lowbit.wire.payload import encode

# where a preset refused at the bench's hidden size / TP fits: name -> (hidden, tp); two-shot messages are
# the hidden / tp chunk. The systems that do not run at TP 3 (QuickReduce: 2/4/8, INT3 2; FlashInfer: a
# power of two; TensorRT-LLM: 2/4) are measured at TP 2.
ELSEWHERE: dict[str, tuple[int, int]] = {
    **{f"quickreduce-int{b}": (576, 2) for b in (3, 4, 6, 8)}, "flashinfer-fp8": (576, 2), "trtllm-fp8": (576, 2)}


def measured_bits(name: str, hidden: int, tp: int, tokens: int, seed: int = 576) -> float:
    """8 x bytes / values of one encoded first-leg message of preset ``name``."""
    scheme = parse_scheme(name)
    width = hidden // tp if scheme.algo == "two_shot" else hidden
    x = torch.randn(tokens, width, generator=torch.Generator().manual_seed(seed))
    payload, _ = encode(x, scheme.quant)
    return 8 * payload.numel() / (tokens * width)


def preset_bits(hidden: int = 576, tp: int = 3, tokens: int = 8) -> list[dict]:
    """One row per preset: expansion, measured and formula bits at ``hidden`` (or where it fits)."""
    rows = []
    for row in accounting.preset_rows(hidden, tp, tokens):
        name = row["preset"]
        out = dict(preset=name, expansion=row["expansion"], hidden=hidden, tp=tp, refused=row["note"] or None,
                   formula_bits=row["format_bits"], measured_bits=None, elsewhere=None)
        if row["note"]:
            if name not in ELSEWHERE:
                raise SystemExit(f"preset {name} is refused at hidden {hidden} and has no size in ELSEWHERE")
            h, t = ELSEWHERE[name]
            formula = next(r for r in accounting.preset_rows(h, t, tokens) if r["preset"] == name)["format_bits"]
            out["elsewhere"] = dict(hidden=h, tp=t, measured_bits=measured_bits(name, h, t, tokens),
                                    formula_bits=formula)
        else:
            out["measured_bits"] = measured_bits(name, hidden, tp, tokens)
        for got in (out, out["elsewhere"] or {}):
            if got.get("measured_bits") is not None and abs(got["measured_bits"] - got["formula_bits"]) > 1e-12:
                raise SystemExit(f"preset {name}: bytes give {got['measured_bits']} bits, the accounting "
                                 f"{got['formula_bits']}")
        rows.append(out)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.formats", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--tp", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--out", default="bench/results/formats-bits.json")
    args = parser.parse_args(argv)
    meta = start_meta("bench.formats", sys.argv[1:] if argv is None else list(argv))
    try:
        rows = preset_bits(args.hidden, args.tp, args.tokens)
    except SchemeError as exc:
        raise SystemExit(str(exc)) from exc
    for r in rows:
        where = r["elsewhere"]
        bits = f"{r['measured_bits']:.4f}" if where is None else \
            f"refused; {where['measured_bits']:.4f} at hidden {where['hidden']}, TP {where['tp']}"
        print(f"{r['preset']:18s} {r['expansion']:58s} {bits}")
    meta = dict(finish_meta(meta), tokens=args.tokens)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

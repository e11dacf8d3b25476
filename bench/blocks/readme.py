"""The README's headline tables: a few rows of the files the docs pages render in full."""
from __future__ import annotations

from bench.blocks.collectives import GATE
from bench.blocks.results import MATCHED_FILES, OUTLIERS, SUM_ERROR, SWEEPS_LM, THROUGHPUT_LINKS
from bench.matched_bits import load_rows as matched_rows
from bench.outliers import ROWS as OUTLIER_ROWS
from bench.blocks import RESULTS, ReportError, block, load, pct, result_path, rows_by_scheme, source_line, table


HEADLINE_SCHEMES = [("int4-token", "Int4, one scale per token"), ("int4-static-top1/64", "the paper"),
                    ("fp4e2m1-group32-se8m0", "MXFP4 format, lowbit's round-up scale, one gather"),
                    ("fp4e2m1-group16-se4m3", "NVFP4 format, lowbit's power-of-two tensor scale, one gather"),
                    ("lm4-group64-rot64", "fitted 4-bit codebook, rotated, scale per 64")]


@block("headline-schemes")
def headline_schemes() -> str:
    by = {r["scheme"]: r for r in matched_rows([str(result_path(n)) for n in [SUM_ERROR] + MATCHED_FILES])}
    rows = [[f"`{s}`", what, f"{by[s]['bits_per_value']:.4g}", f"{by[s]['kl']:.3f}", pct(by[s]["top1_agreement"])]
            for s, what in HEADLINE_SCHEMES]
    files = dict.fromkeys(by[s]["source"] for s, _ in HEADLINE_SCHEMES)
    return table(["scheme", "what", "bits/value", "KL", "top-1 agree"], rows) + "\n\n" + \
        "\n".join(f"- {source_line(n, load(n))}" for n in files)


@block("headline-allocation")
def headline_allocation() -> str:
    """The lowest KL any per-site allocation sweep reached at each budget, next to the paper's point."""
    best, paper = {}, None
    for name in SWEEPS_LM:
        data = load(name)
        points = {p["scheme"]: p for p in data["points"]}
        paper = paper or points.get("int4-static-top1/64")
        for budget, scheme in data["best_at"].items():
            if budget not in best or points[scheme]["kl"] < best[budget][0]["kl"]:
                best[budget] = (points[scheme], data["run"]["id"], name)
    if paper is None:
        raise ReportError("no sweep holds the paper's point int4-static-top1/64")
    rows = [["paper `int4-static-top1/64`", "", f"{paper['bits_per_value']:.4f}", f"{paper['kl']:.4f}",
             pct(paper["top1_agreement"])]]
    for budget, (p, run, _) in sorted(best.items(), key=lambda kv: -float(kv[0])):
        rows.append([f"per-site map, budget {budget}", f"`{run}`", f"{p['bits_per_value']:.3f}", f"{p['kl']:.4f}",
                     pct(p["top1_agreement"])])
    files = dict.fromkeys(n for _, _, n in best.values())
    return table(["scheme", "sweep", "bits/value", "KL", "top-1 agree"], rows) + "\n\n" + \
        "\n".join(f"- `{RESULTS / n}` (spec `{RESULTS / n.replace('.json', '.spec.json')}`)" for n in files)


@block("headline-collectives")
def headline_collectives() -> str:
    data = load(GATE)
    by = {(r["link"], r["method"]): r for r in data["records"] if r["tokens"] == 8192}
    links = list(dict.fromkeys(r["link"] for r in data["records"]))
    rows = [[link, f"{by[(link, 'exact')]['median_ms']:.0f}", f"{by[(link, 'gather')]['speedup_vs_bf16']:.2f}x",
             f"{by[(link, 'two_shot')]['speedup_vs_bf16']:.2f}x"] for link in links]
    schemes = ", ".join(f"{m} `{by[(links[0], m)]['scheme']}`" for m in ("gather", "two_shot"))
    return table(["link", "bf16 all-reduce ms", "gather × bf16", "two-shot × bf16"], rows) + "\n\n" + \
        source_line(GATE, data, f"TP 3, 8192 x 576; {schemes}")


@block("headline-throughput")
def headline_throughput() -> str:
    rows, sources = [], []
    for label, name in THROUGHPUT_LINKS:
        data = load(name)
        paper, gated = rows_by_scheme(dict(rows=data["records"]), ["int4-static-top1/64", "int4-static-top1/64@minauto"])
        rows.append([label, f"{paper['prefill_speedup']:.2f}", f"{paper['decode_speedup']:.2f}",
                     f"{gated['decode_speedup']:.2f}"])
        sources.append(source_line(name, data))
    head = ["link", "prefill × bf16", "decode × bf16", "decode × bf16, size gate `@minauto`"]
    return table(head, rows) + "\n\n" + "\n".join(f"- {s}" for s in sources)


HEADLINE_OUTLIERS = ["Jaccard random sets", "Jaccard later batches vs EMA, mean", "largest stored partial |x|",
                     "largest stored partial: layer/module/rank", "largest stored partial / median |x| there",
                     "sites with range > ratio x median"]


@block("headline-outliers")
def headline_outliers() -> str:
    data = load(OUTLIERS)
    models = list(data["models"].values())
    fmt = dict(OUTLIER_ROWS)
    head = [""] + [f"{m['model']} TP {m['tp']}" for m in models]
    return table(head, [[label] + [fmt[label](m) for m in models] for label in HEADLINE_OUTLIERS]) + "\n\n" + \
        source_line(OUTLIERS, data, f"ratio {models[0]['ratio']:g}")

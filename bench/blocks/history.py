"""The tables of docs/history.md: results that newer code superseded, each still from its file."""
from __future__ import annotations

from bench.blocks.collectives import LINKS_SMALL
from bench.blocks.kernels import moved_note
from bench.blocks.teaching import DEMO_BEFORE, demo_rows
from bench.collectives import markdown_table as collectives_markdown
from bench.blocks import block, load, ms, source_line, table
from bench.throughput import markdown as throughput_markdown


KERNEL_CPU_ROWS = {"int4-static-top1/64": [(1, 576), (16, 576), (16, 4096), (256, 576), (2048, 576), (8192, 576), (8192, 4096), (8192, 5120)],
                   "int4-group32-top1/64": [(2048, 576), (8192, 576), (8192, 5120)]}


@block("kernels-cpu")
def kernels_cpu() -> str:
    name = "kernels-cpu.json"
    data = load(name)
    codec = data["cpu"]["codec"]
    pairs = {(e["scheme"], e["tokens"], e["hidden"]): (e, f) for e, f in zip(codec[::2], codec[1::2])}
    rows = []
    for scheme, sizes in KERNEL_CPU_ROWS.items():
        for tokens, hidden in sizes:
            e, f = pairs[(scheme, tokens, hidden)]
            rows.append([f"`{e['scheme']}`", f"{e['tokens']} x {e['hidden']}", ms(e["allreduce_s"]),
                     f"{ms(e['quantize_s'])} + {ms(e['unpack_sum_s'])}",
                     f"{ms(f['quantize_s'])} + {ms(f['unpack_sum_s'])}",
                     f"{e['quantize_s'] / f['quantize_s']:.1f}x / {e['unpack_sum_s'] / f['unpack_sum_s']:.1f}x",
                     f"{e['fraction_of_allreduce']:.1f}", f"{f['fraction_of_allreduce']:.1f}"])
    head = ["scheme", "tokens x hidden", "all_reduce ms", "eager q + u ms", "compiled q + u ms", "speedup q / u",
            "eager / all_reduce", "compiled / all_reduce"]
    return table(head, rows) + "\n\n" + source_line(name, data, moved_note(data))


@block("collectives-8192")
def collectives_8192() -> str:
    name = "collectives-tp3-8192x576.json"
    data = load(name)
    return collectives_markdown(data["records"]) + "\n\n" + source_line(name, data)


@block("throughput-eager")
def throughput_eager() -> str:
    name = "throughput.json"
    data = load(name)
    return throughput_markdown(data) + "\n\n" + source_line(name, data)


@block("collectives-small")
def collectives_small() -> str:
    data = load(LINKS_SMALL)
    return collectives_markdown(data["records"]) + "\n\n" + source_line(LINKS_SMALL, data)


GRID = "collectives-loopback-grid.json"


@block("collectives-grid")
def collectives_grid() -> str:
    """The loopback grid (TP 2/3/4, several sizes) in one line per TP: how the quantized records compare with bf16."""
    data = load(GRID)
    rows = []
    for tp in sorted({r["tp"] for r in data["records"]}):
        quant = [r["speedup_vs_bf16"] for r in data["records"]
                 if r["tp"] == tp and r["method"] != "exact" and r.get("speedup_vs_bf16") is not None]
        quant.sort()
        rows.append([str(tp), str(len(quant)), str(sum(s > 1 for s in quant)), f"{quant[len(quant) // 2]:.2f}",
                     f"{quant[0]:.2f} - {quant[-1]:.2f}"])
    head = ["TP", "quantized records", "faster than bf16", "median × bf16", "range × bf16"]
    return table(head, rows) + "\n\n" + source_line(GRID, data)


@block("demo-gemma-before")
def demo_gemma_before() -> str:
    return demo_rows(DEMO_BEFORE)

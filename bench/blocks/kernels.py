"""The tables of docs/kernels.md: the native CPU codec against the torch paths, per op."""
from __future__ import annotations

from bench.blocks import block, load, ms, source_line, table


def moved_note(data: dict) -> str:
    """The source-line note of a kernel-bench file (this page's and the history's): files made before
    the kernel benches moved to ``bench/`` say ``kernels.bench`` and ``kernels/results``, so the note
    names where it was made; "" for newer files."""
    command = data["meta"].get("command", "")
    if "--out kernels/" not in command:
        return ""
    return f"made as `{command.split('--out ')[1].split()[0]}` by `kernels.bench`, which is now `bench.kernels`; " \
        "moved here unchanged"


@block("kernels-native-summary")
def kernels_native_summary() -> str:
    """Per scheme, over every size of the native run: how much less CPU time (quantize + unpack) the
    numba kernels take than the reference and the compiled path, and the single ops where one of
    them is ahead (what ``kernels.dispatch``'s CPU rule rests on)."""
    name = "kernels-cpu-native.json"
    data = load(name)
    by = {(r["scheme"], r["tokens"], r["hidden"], r["path"]): r for r in data["native"]["codec"]}
    total = lambda r: r["quantize_cpu_s"] + r["unpack_sum_cpu_s"]  # noqa: E731
    rows, ahead = [], []
    for scheme in dict.fromkeys(r["scheme"] for r in data["native"]["codec"]):
        sizes = sorted({(t_, h) for s, t_, h, p in by if s == scheme})
        ratios = {other: [total(by[(scheme, *size, other)]) / total(by[(scheme, *size, "native")]) for size in sizes]
                  for other in ("reference", "compiled")}
        rows.append([f"`{scheme}`", f"{sizes[0][0]}-{sizes[-1][0]} x {sizes[0][1]}"] +
                    [f"{min(v):.1f}-{max(v):.1f}x" for v in ratios.values()] +
                    ["yes" if all(by[(scheme, *size, p)]["bit_identical"] for size in sizes
                                  for p in ("native", "compiled")) else "**no**"])
        for size in sizes:
            for op in ("quantize_cpu_s", "unpack_sum_cpu_s"):
                n = by[(scheme, *size, "native")][op]
                for other in ("reference", "compiled"):
                    if by[(scheme, *size, other)][op] < n:
                        ahead.append(f"`{scheme}` {size[0]} x {size[1]} {op.split('_cpu')[0]}: {other} "
                                     f"{ms(by[(scheme, *size, other)][op])} ms vs native {ms(n)} ms")
    head = ["scheme", "tokens x hidden", "reference / native (CPU time)", "compiled / native", "bit-identical"]
    note = "single ops where a torch path is ahead: " + ("; ".join(ahead) or "none")
    return table(head, rows) + "\n\n" + source_line(name, data, moved_note(data)) + "\n\n" + note


@block("kernels-native")
def kernels_native() -> str:
    name = "kernels-cpu-native.json"
    data = load(name)
    by = {(r["path"], r["tokens"]): r for r in data["native"]["codec"] if r["scheme"] == "int4-static-top1/64"}
    rows = []
    for tokens in sorted({t for _, t in by}):
        cells = [str(tokens)]
        for path in ("native", "compiled", "reference"):
            r = by[(path, tokens)]
            cells.append(f"{ms(r['quantize_cpu_s'])} / {ms(r['unpack_sum_cpu_s'])}")
        cells.append(ms(by[("native", tokens)]["copy_bf16_s"]))
        rows.append(cells)
    head = ["tokens x 576", "native q / u ms", "compiled q / u ms", "reference q / u ms", "bf16 copy ms"]
    return table(head, rows) + "\n\n" + source_line(name, data, moved_note(data))

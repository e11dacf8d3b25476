"""The measured tables of README.md and every docs/*.md are what bench.report renders from
bench/results (issues 17 and 24); README stays a short front page that links every docs page.

    .venv/bin/python -m pytest tests/test_readme_tables.py -q
"""
from __future__ import annotations

import json
import re
import shutil

import pytest

from bench import blocks, report
from bench.blocks.results import _text_rows

README = blocks.ROOT / "README.md"
README_MAX_LINES = 250  # issue 24: the front page, not the manual


def _drift(body: str) -> str:
    """``body`` with its first table digit after the header changed: what a stale table looks like."""
    digit = next(i for i, c in enumerate(body) if c.isdigit() and i > body.index("\n|---"))
    return body[:digit] + str((int(body[digit]) + 1) % 10) + body[digit + 1:]


def test_readme_and_docs_tables_match_their_result_files():
    problems = report.check()
    assert not problems, "\n".join(problems) + "\nrun: .venv/bin/python -m bench.report"


def test_every_block_name_is_a_table_and_every_table_is_placed_once_in_readme_or_docs():
    names = [m.group("name") for page in report.documents() for m in report.BLOCK.finditer(page.read_text())]
    assert [n for n in set(names) if names.count(n) > 1] == [], "a table appears twice"
    assert set(names) == set(report.TABLES)
    assert len(report.documents()) > 1 and all(p.suffix == ".md" for p in report.documents())


def test_readme_is_short_starts_with_the_two_commands_and_links_every_docs_page():
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    first_code = re.search(r"```bash\n(.*?)```", text, re.S)
    assert first_code and first_code.start() < text.index("\n## ", text.index("## Two commands") + 1)
    assert [line.split()[:2] for line in first_code.group(1).splitlines()] == [["make", "run"], ["make", "test"]]
    pages = [p.relative_to(blocks.ROOT).as_posix() for p in report.documents()[1:]]
    assert [p for p in pages if f"]({p})" not in text] == [], "a docs page the README does not link"
    image = re.search(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert image and (blocks.ROOT / image.group(1)).stat().st_size < 200_000  # a screenshot, kept small in git


def test_check_names_a_table_whose_numbers_drifted_and_a_table_outside_blocks(tmp_path):
    text = README.read_text()
    block = next(m for m in report.BLOCK.finditer(text) if "\n|---" in m.group("body"))
    body = block.group("body")
    drifted = _drift(body)
    readme = tmp_path / "README.md"
    readme.write_text(text.replace(body, drifted, 1) + "\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    problems = report.check([readme])
    assert any(f"table '{block.group('name')}' differs" in p for p in problems)
    stray = len(readme.read_text().split("\n")) - 3
    assert any(p.startswith(f"README.md:{stray}: a table outside") for p in problems)


def test_check_covers_every_docs_page_found_by_glob(tmp_path, monkeypatch, capsys):
    """A new docs page needs no registration: its drifted block, an unknown block, a table placed
    twice and a stray table are each named with page and line, and --check exits 1."""
    (tmp_path / "bench").mkdir()
    shutil.copytree(blocks.ROOT / "bench" / "results", tmp_path / "bench" / "results")
    (tmp_path / "docs").mkdir()
    shutil.copy(README, tmp_path / "README.md")
    for page in report.documents()[1:]:
        shutil.copy(page, tmp_path / "docs" / page.name)
    monkeypatch.setattr(blocks, "ROOT", tmp_path)
    assert report.check() == []
    name, body = next((m.group("name"), m.group("body")) for p in report.documents()[1:]
                      for m in report.BLOCK.finditer(p.read_text()) if "\n|---" in m.group("body"))
    new_page = (f"# New\n\n<!-- table: {name} -->\n{_drift(body)}<!-- /table -->\n\n"
                "<!-- table: no-such-table -->\n<!-- /table -->\n\n| a | b |\n|---|---|\n")
    (tmp_path / "docs" / "zz-new.md").write_text(new_page)
    problems = report.check()
    assert any(p.startswith(f"docs/zz-new.md:3: table '{name}' is placed twice") for p in problems), problems
    assert any(p.startswith(f"docs/zz-new.md:3: table '{name}' differs") for p in problems), problems
    assert any(p.startswith("docs/zz-new.md:") and "'no-such-table': unknown table" in p for p in problems), problems
    stray = new_page.split("\n").index("| a | b |") + 1
    assert f"docs/zz-new.md:{stray}: a table outside every <!-- table: NAME --> block" in problems
    assert report.main(["--check"]) == 1
    assert "docs/zz-new.md" in capsys.readouterr().out


def test_rendering_fills_an_empty_block_of_a_new_page_and_a_registered_table_must_be_placed(tmp_path, monkeypatch):
    (tmp_path / "bench").mkdir()
    shutil.copytree(blocks.ROOT / "bench" / "results", tmp_path / "bench" / "results")
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# x\n")
    (tmp_path / "docs" / "p.md").write_text("<!-- table: presets -->\n<!-- /table -->\n")
    monkeypatch.setattr(blocks, "ROOT", tmp_path)
    assert report.main([]) == 0
    text = (tmp_path / "docs" / "p.md").read_text()
    assert "| `mxfp4` | `fp4e2m1-group32-se8m0fl@flat2shot` | 4.2500 |" in text  # the preset since issue 26 and "Source: `bench/results/formats-bits.json`" in text
    problems = report.check()
    assert "table 'uniform' is registered but no page places it (README.md or docs/*.md)" in problems
    assert not any("presets" in p for p in problems)


def test_a_table_name_registered_twice_is_refused():
    with pytest.raises(ValueError, match="'presets' is registered twice"):
        report.block("presets")(lambda: "")


def test_unknown_block_and_missing_file_are_named(tmp_path, monkeypatch):
    with pytest.raises(report.ReportError, match="'nope': unknown table; allowed: accuracy, accuracy-gemma3-tp2, accuracy-plan, "):
        report.render("<!-- table: nope -->\nx\n<!-- /table -->")
    monkeypatch.setattr(blocks, "ROOT", tmp_path)
    with pytest.raises(report.ReportError, match="accuracy.json: no such result file"):
        report.render("<!-- table: accuracy -->\nx\n<!-- /table -->")


def test_source_line_names_file_command_date_and_load():
    line = blocks.source_line("x.json", dict(meta=dict(command="python -m bench.x --out x.json",
                                                       date="2026-12-02T10:00:00+00:00",
                                                       load=dict(start=[2.25, 1, 1], end=[3.0, 1, 1]))))
    assert line == ("Source: `bench/results/x.json`: `python -m bench.x --out x.json` "
                    "(2026-12-02 10:00:00, load 2.2 -> 3.0)")


def test_rendered_sum_error_row_is_the_files_numbers(tmp_path, monkeypatch):
    rows = [dict(scheme="int4-token", bits_per_value=4.0277, kl=0.31249, top1_agreement=0.7254, ppl=33.46,
                 mean_rel_error=0.1, median_rel_error=0.1, max_rel_error=0.2, sites=60, tokens=510)]
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "t.json").write_text(json.dumps(dict(meta=dict(command="c"), rows=rows)))
    monkeypatch.setattr(blocks, "ROOT", tmp_path)
    out = _text_rows("t.json", ["int4-token"], rel_error=True)
    assert "| `int4-token` | 4.028 | 0.312 | 72.5% | 33.5 | 0.100 |" in out


def test_each_table_is_rendered_by_the_module_of_its_page():
    """bench/blocks/<page>.py renders the tables of docs/<page>.md (readme.py: README.md), so the
    renderer of a table is found from the page that shows it."""
    placed = {m.group("name"): page for page in report.documents() for m in report.BLOCK.finditer(page.read_text())}
    wrong = []
    for name, render in report.TABLES.items():
        module = render.__module__.rsplit(".", 1)[-1]
        page = placed[name].relative_to(blocks.ROOT).as_posix()
        if page != ("README.md" if module == "readme" else f"docs/{module}.md"):
            wrong.append(f"{name}: rendered by bench/blocks/{module}.py, placed in {page}")
    assert wrong == []


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_between_the_pages_reaches_a_file_and_a_heading():
    broken = []
    for page in report.documents():
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if "://" in target or target.startswith("mailto:"):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target}: no such file")
            elif anchor and file.suffix == ".md":
                headings = [_slug(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), re.M)]
                if anchor not in headings:
                    broken.append(f"{page.name}: {target}: no heading with that anchor")
    assert broken == []


def test_meta_records_the_load_as_one_block_with_start_and_end(monkeypatch):
    from bench import _meta
    averages = iter([(2.254, 1.0, 0.5), (3.126, 1.5, 0.75)])
    monkeypatch.setattr(_meta.os, "getloadavg", lambda: next(averages))
    meta = _meta.start_meta("bench.x", ["--out", "x.json"])
    assert meta["command"] == "python -m bench.x --out x.json"
    assert meta["load"] == {"start": [2.25, 1.0, 0.5]}
    assert _meta.finish_meta(meta)["load"] == {"start": [2.25, 1.0, 0.5], "end": [3.13, 1.5, 0.75]}


def _load_keys(node, where: str = ""):
    """(path, key, value) of every key that names a load, anywhere in a parsed JSON file."""
    if isinstance(node, dict):
        for key, value in node.items():
            if "load" in key.lower() and key != "load_note":
                yield f"{where}/{key}", key, value
            yield from _load_keys(value, f"{where}/{key}")
    elif isinstance(node, list):
        for value in node:
            yield from _load_keys(value, f"{where}[]")


def test_every_result_file_spells_the_load_one_way():
    """bench._meta's block ({"start": [3 averages], "end": [...]}) under the key "load" is the only
    way a stored result records the machine's load (the blocks read only that)."""
    seen = 0
    for path in sorted((blocks.ROOT / blocks.RESULTS).glob("*.json")):
        for where, key, value in _load_keys(json.loads(path.read_text())):
            if where.endswith("/stages/loading"):  # bench.demo_timing: the seconds of the run's loading stage
                continue
            if key.startswith("page_load"):  # bench.classroom_load: a page's load in a browser, timed
                continue
            assert key == "load", f"{path.name}: {where} spells the load another way"
            assert isinstance(value, dict) and set(value) <= {"start", "end"} and "start" in value, (path.name, where)
            assert all(isinstance(v, list) and 1 <= len(v) <= 3 for v in value.values()), (path.name, where, value)
            seen += 1
    assert seen >= 20, seen  # the files that record a load (collectives, kernels, demo, sweeps, ...)

"""README's measured tables are what bench.report renders from bench/results (issue 17)."""
from __future__ import annotations

import json

import pytest

from bench import report


DOCS = sorted((report.ROOT / "docs").glob("*.md"))  # docs/ pages carry blocks too (docs/classroom.md)


def test_readme_tables_match_their_result_files():
    problems = report.check() + [p for doc in DOCS for p in report.check(doc)]
    assert not problems, "\n".join(problems) + "\nrun: .venv/bin/python -m bench.report (--readme docs/<page>.md)"


def test_every_block_name_is_a_table_and_every_table_has_a_block_in_readme():
    names = [m.group("name") for path in [report.README, *DOCS] for m in report.BLOCK.finditer(path.read_text())]
    assert sorted(names) == sorted(set(names)), "a table appears twice"
    assert set(names) == set(report.TABLES)


def test_check_names_a_table_whose_numbers_drifted_and_a_table_outside_blocks(tmp_path):
    text = report.README.read_text()
    block = next(m for m in report.BLOCK.finditer(text) if "\n|---" in m.group("body"))
    body = block.group("body")
    digit = next(i for i, c in enumerate(body) if c.isdigit() and i > body.index("\n|---"))
    drifted = body[:digit] + str((int(body[digit]) + 1) % 10) + body[digit + 1:]
    readme = tmp_path / "README.md"
    readme.write_text(text.replace(body, drifted, 1) + "\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    problems = report.check(readme)
    assert any(f"table '{block.group('name')}' differs" in p for p in problems)
    stray = len(readme.read_text().split("\n")) - 3
    assert any(p.startswith(f"README.md:{stray}: a table outside") for p in problems)


def test_unknown_block_and_missing_file_are_named(tmp_path, monkeypatch):
    with pytest.raises(report.ReportError, match="'nope': unknown table; allowed: uniform"):
        report.render("<!-- table: nope -->\nx\n<!-- /table -->")
    monkeypatch.setattr(report, "ROOT", tmp_path)
    with pytest.raises(report.ReportError, match="accuracy.json: no such result file"):
        report.render("<!-- table: accuracy -->\nx\n<!-- /table -->")


def test_source_line_names_file_command_date_and_load():
    line = report.source_line("x.json", dict(meta=dict(command="python -m bench.x --out x.json",
                                                       date="2026-12-02T10:00:00+00:00",
                                                       load_avg_start=[2.25, 1, 1], load_avg_end=[3.0, 1, 1])))
    assert line == ("Source: `bench/results/x.json`: `python -m bench.x --out x.json` "
                    "(2026-12-02 10:00:00, load 2.2 -> 3.0)")


def test_rendered_sum_error_row_is_the_files_numbers(tmp_path, monkeypatch):
    rows = [dict(scheme="int4-token", bits_per_value=4.0277, kl=0.31249, top1_agreement=0.7254, ppl=33.46,
                 mean_rel_error=0.1, median_rel_error=0.1, max_rel_error=0.2, sites=60, tokens=510)]
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "t.json").write_text(json.dumps(dict(meta=dict(command="c"), rows=rows)))
    monkeypatch.setattr(report, "ROOT", tmp_path)
    out = report._text_rows("t.json", ["int4-token"], rel_error=True)
    assert "| `int4-token` | 4.028 | 0.312 | 72.5% | 33.5 | 0.100 |" in out

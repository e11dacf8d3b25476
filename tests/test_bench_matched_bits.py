"""bench.matched_bits renders sum-error files into one table: sorted by bits, one row per scheme,
a scheme measured twice must agree, a file without meta is refused."""
from __future__ import annotations

import json

import pytest

from bench.matched_bits import load_rows, markdown

META = dict(command="python -m lowbit.method.sweep sum-error ...", date="2026-12-02T00:00:00+00:00",
            load=dict(start=[1.0, 1.0, 1.0], end=[1.0, 1.0, 1.0]), machine="2-core CPU")


def _row(scheme, bits, kl):
    return dict(scheme=scheme, bits_per_value=bits, kl=kl, top1_agreement=0.5, ppl=30.0, mean_rel_error=0.1,
                median_rel_error=0.1, max_rel_error=0.2, sites=60, tokens=510, table_bytes=0)


def test_rows_sort_by_bits_then_kl_and_name_their_file(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(dict(meta=META, rows=[_row("x", 4.25, 0.2), _row("y", 4.0, 0.3)])))
    b.write_text(json.dumps(dict(meta=META, rows=[_row("z", 4.25, 0.1), _row("x", 4.25, 0.2)])))
    rows = load_rows([str(a), str(b)])
    assert [r["scheme"] for r in rows] == ["y", "z", "x"] and rows[2]["source"] == "a.json"
    text = markdown(rows)
    assert text.splitlines()[2].startswith("| `y` | 4 | 0.3000 | 50.0% |") and len(text.splitlines()) == 5


def test_disagreeing_or_metaless_files_are_refused(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(dict(meta=META, rows=[_row("x", 4.25, 0.2)])))
    b.write_text(json.dumps(dict(meta=META, rows=[_row("x", 4.25, 0.3)])))
    with pytest.raises(ValueError, match="KL 0.2"):
        load_rows([str(a), str(b)])
    b.write_text(json.dumps(dict(rows=[])))
    with pytest.raises(ValueError, match="meta"):
        load_rows([str(b)])


def test_a_preset_row_written_before_issue_26_is_read_as_the_scheme_it_measured(tmp_path):
    """quickreduce-int4 in a file of 2026-12-02 measured lowbit's own int4-group32-sfp16 two-shot; the
    same name in a later file is QuickReduce's emulation: both rows stand, under different names."""
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(dict(meta=META, rows=[_row("quickreduce-int4", 6.0, 0.498), _row("int4-token", 4.0, 1.4)])))
    new.write_text(json.dumps(dict(meta=dict(META, date="2026-12-03T10:30:00+00:00"),
                                   rows=[_row("quickreduce-int4", 9.0, 0.7)])))
    by = {r["scheme"]: r for r in load_rows([str(old), str(new)])}
    assert by["int4-group32-sfp16@twoshot+int4-group32-sfp16"]["kl"] == 0.498
    assert by["quickreduce-int4"]["kl"] == 0.7 and by["int4-token"]["kl"] == 1.4

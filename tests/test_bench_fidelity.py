"""`gkd bench fidelity` at smoke-test size: every stage runs (corpus, tokenizer, teacher, students in two
worker processes, evaluation), the JSON lines carry mean, spread and per-seed values, and the README
table is generated from them. The real run (about 20 minutes) is `make fidelity`, not part of the tests."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from workers.bench import cli
from workers.bench.fidelity_table import END, START, read_rows, render, update_readme

KEYS = ["ce", "full", "tail_k2", "renorm_k2", "sampled_k2", "tail_k4", "renorm_k4", "sampled_k4"]


@pytest.fixture(scope="module")
def bench_lines(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bench's stdout, through the `gkd bench` command line."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["fidelity", "--json", "--tiny", "--seeds", "2", "--ks", "2,4", "--procs", "2"])
    assert code == 0
    path = tmp_path_factory.mktemp("fidelity") / "fidelity.jsonl"
    path.write_text(out.getvalue())
    return path


def test_rows_hold_mean_spread_and_per_seed_values_for_every_loss_and_k(bench_lines: Path) -> None:
    rows = [json.loads(line) for line in bench_lines.read_text().splitlines()]
    assert all(list(row)[:6] == list(cli.FIELDS) for row in rows)  # the common fields come first
    by = {row["metric"]: row for row in rows}
    for key in KEYS:
        for metric in ("ce", "kl"):
            row = by[f"{metric}_{key}"]
            assert row["unit"] == "nats/token" and len(row["seeds"]) == 2
            assert all(math.isfinite(v) and v >= 0 for v in row["seeds"])
            assert row["value"] == pytest.approx(statistics.fmean(row["seeds"]))
            assert row["spread"] == pytest.approx(statistics.stdev(row["seeds"]))
            full = by[f"{metric}_full"]["value"]
            assert row["baseline"] == (None if key == "full" else pytest.approx(full))
    # Students of one seed start from the same weights but learn from different signals.
    assert len({by[f"kl_{key}"]["seeds"][0] for key in KEYS}) == len(KEYS)
    assert by["entries_tail_k2"]["value"] == 2 and by["entries_renorm_k4"]["value"] == 4
    assert 1 <= by["entries_sampled_k2"]["value"] <= 2 and 1 <= by["entries_sampled_k4"]["value"] <= 4
    assert by["entries_full"]["value"] == by["wall_s"]["settings"]["vocab"]
    assert math.isfinite(by["ce_teacher"]["value"]) and by["wall_s"]["value"] > 0


def test_readme_table_is_generated_from_the_lines(bench_lines: Path, tmp_path: Path) -> None:
    table = render(read_rows(bench_lines))
    labels = ("cross-entropy only", "full-vocabulary KD", "top-k `tail`, k = 2", "RS-KD `sampled`, k = 4")
    for label in labels:
        assert label in table
    assert table.count("\n| ") == 1 + len(KEYS)  # after the header: the teacher, one row per loss
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{START}\nold table\n{END}\n\nafter\n")
    update_readme(readme, table)
    update_readme(readme, table)  # idempotent
    text = readme.read_text()
    assert "old table" not in text and text.count(table) == 1 and text.endswith(f"{END}\n\nafter\n")
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="expected the markers"):
        update_readme(readme, table)

"""The benchmark report writer: it owns only its marked section of docs/BENCHMARKS.md, and formats numbers as its
module docstring documents. (The only part of bench/ that runs in the test suite.)"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.report import (
    BEGIN,
    END,
    fmt_mb,
    fmt_ms,
    fmt_pct,
    fmt_range,
    fmt_ratio,
    fmt_rps,
    render,
    write_section,
)

LEAD_TEXT = """# Benchmarks

## Profile (written by hand)

py-spy says h11 is 57% of the CPU.

{begin}
old generated tables
{end}

## Closing note

Targets missed: none yet.
"""


def test_rewrites_only_its_section_and_keeps_foreign_ones(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(LEAD_TEXT.format(begin=BEGIN, end=END), encoding="utf-8")
    write_section(path, "new tables")
    text = path.read_text(encoding="utf-8")
    assert text == LEAD_TEXT.format(begin=BEGIN, end=END).replace("old generated tables", "new tables")
    write_section(path, "newer tables\n")  # idempotent shape: still one section, foreign text untouched
    text = path.read_text(encoding="utf-8")
    assert text.count(BEGIN) == text.count(END) == 1
    assert "## Profile (written by hand)" in text and "Targets missed: none yet." in text
    assert "newer tables" in text and "new tables\n" not in text


def test_a_file_without_markers_gets_the_section_appended(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nHand-written intro.", encoding="utf-8")
    write_section(path, "tables")
    assert (
        path.read_text(encoding="utf-8") == f"# Benchmarks\n\nHand-written intro.\n\n{BEGIN}\ntables\n{END}\n"
    )


def test_a_missing_file_is_created(tmp_path: Path) -> None:
    path = tmp_path / "docs" / "BENCHMARKS.md"
    write_section(path, "tables")
    assert path.read_text(encoding="utf-8") == f"# Benchmarks\n\n{BEGIN}\ntables\n{END}\n"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(4351.4, "4,351"), (93.44, "93.4"), (100.0, "100"), (45287.0, "45,287"), (math.nan, "–"), (None, "–")],
)
def test_requests_per_second(value: float | None, expected: str) -> None:
    assert fmt_rps(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0.0734, "0.073"), (3.274, "3.27"), (14.23, "14.2"), (1533.2, "1,533"), (math.nan, "–")],
)
def test_milliseconds(value: float, expected: str) -> None:
    assert fmt_ms(value) == expected


def test_signed_differences_and_other_units() -> None:
    assert fmt_ms(0.2551, signed=True) == "+0.255"
    assert fmt_ms(-0.05, signed=True) == "-0.050"
    assert fmt_ms(12.4, signed=True) == "+12.4"
    assert fmt_ratio(0.4249) == "0.42×"
    assert fmt_ratio(57.0) == "57.00×"
    assert fmt_ratio(math.inf) == fmt_ratio(math.nan) == "–"
    assert fmt_pct(0.974) == "97%"
    assert fmt_mb(28.34) == "28.3"
    assert fmt_range([4351.0, 3726.0, 4501.0]) == "4,351 (3,726–4,501)"
    assert fmt_range([1.0]) == "1.0"
    assert fmt_range([math.nan]) == "–"


def test_render_shows_medians_added_latency_and_ratios() -> None:
    def run(rps: float, p50: float) -> dict[str, object]:
        return {"rps": rps, "p50": p50, "p99": p50 * 3, "errors": 0, "cpu_per_request_us": 1e6 / rps,
                "gen_cpu": 0.2, "cpu_busy": [0.3, 0.9]}  # fmt: skip

    results = {
        "meta": {"nproc": 2, "versions": {"trio": "0.35.0"}},
        "lanes": {"litellm": {"description": "LiteLLM", "skipped": "LiteLLM is not installed"}},
        "scenarios": {
            "small": {
                "date": "2026-11-26",
                "mode": "quick",
                "command": "python -m bench --quick",
                "data": {
                    "levels": [1],
                    "generator": "wrk",
                    "runs": {
                        "direct": {"1": [run(10000, 0.07), run(12000, 0.08), run(11000, 0.09)]},
                        "trioproxy-1": {"1": [run(3000, 0.33), run(2000, 0.40), run(2500, 0.35)]},
                    },
                },
            }
        },
    }
    text = render(results)
    row = next(line for line in text.splitlines() if line.startswith("| trioproxy-1 | 1 |"))
    # median 2,500 (2,000–3,000); p50 0.350 - 0.080 = +0.270; 2,500 / 11,000 = 0.23×
    assert "2,500 (2,000–3,000)" in row
    assert "+0.270" in row
    assert "0.23×" in row
    assert "skipped: LiteLLM is not installed" in text
    assert "`python -m bench --quick`" in text

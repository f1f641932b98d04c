"""Stages only parse params, call the library, write outputs and log (issue 10 item 3, shown by: `stages/`
under 600 lines in total, no stage over 120): logic that grows in a stage belongs in `pipeline/`."""

from __future__ import annotations

from pathlib import Path

STAGES = Path(__file__).resolve().parents[1] / "stages"
TOTAL, EACH = 600, 120


def _lines() -> dict[str, int]:
    return {p.name: len(p.read_text().splitlines()) for p in sorted(STAGES.glob("*.py"))}


def test_stages_total_under_600_lines():
    lines = _lines()
    assert "cli.py" in lines and sum(lines.values()) < TOTAL, lines


def test_no_stage_over_120_lines():
    lines = _lines()
    assert not {name: n for name, n in lines.items() if n > EACH}, lines

"""A quick run of the benchmark (one repetition, small inputs), so bench/run.py cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not hasattr(os, "wait4"), reason="the benchmark reads peak memory with os.wait4 (POSIX)")
def test_quick_benchmark_measures_every_case_and_judges_every_target(tmp_path: Path) -> None:
    output = tmp_path / "benchmarks.md"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--output", str(output)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    text = output.read_text(encoding="utf-8")
    assert done.stdout == text
    peak = r"[\d.,]+ \([\d.,]+-[\d.,]+\)"
    rows = re.findall(rf"^\| (.+?) \| [\d,]+ \([\d,]+-[\d,]+\) \| {peak} \| ({peak}|-) \|$", text, flags=re.M)
    cases = [case for case, _ in rows]
    assert cases[:2] == ["`python -c pass`", "`python scripts/generate_image.py --version`"]
    assert {"this tool, 1024x1024", "curl \\| sed \\| base64 -d, 1024x1024", "this tool, edit 5 x 1 MB",
            "batch of 4, 0.2 s each, -j 4", "batch of 30, instant server, -j 16", "this tool, --stream, 1024x1024",
            "batch of 4 x 1024x1024, -j 4, answers together"} <= set(cases)
    workers = dict(rows)
    assert workers["this tool, 1024x1024"] != "-" and workers["`python -c pass`"] == "-"
    assert "worker peak" in text and "the waiting command's own peak" in text
    if "Left out: the Node twin's rows" not in text:
        assert {"`node -e 0`", "`node scripts/generate_image.js --version`", "the Node twin, 1024x1024"} <= set(cases)
        assert workers["the Node twin, 1024x1024"] != "-" and "the Node twin, 1024x1024: worker peak" in text
    verdicts = re.findall(r"^\| .+ \| .+ \| (PASS|MISS) \|$", text, flags=re.M)
    assert len(verdicts) >= 8
    assert "python bench/run.py --quick" in text and "Machine: " in text

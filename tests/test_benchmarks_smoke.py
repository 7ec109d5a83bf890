"""The GPU benchmark's --tiny mode runs every variant (eager, by hand, frzcompile with and without the cache,
both torch.compile paths) on tiny models: a smoke test that the script works, not a timing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def test_bench_gpu_tiny_runs_every_variant(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "tiny.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--tiny", "--device", "cpu",
                             "--out", str(out)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TRITON_INTERPRET": "0"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert "fm half / by hand" in result.stdout
    data = json.loads(out.read_text())
    assert len(data["workloads"]) == 4
    for row in data["workloads"]:
        assert row["frozen_units"]
        for variant in ("eager", "fm none", "by hand", "fm half", "fm half+cache", "compile by hand", "fm compile"):
            assert row[variant]["ms"] > 0
        # the frozen half saves less for backward than training everything, by hand and through frzcompile alike
        assert row["fm half"]["saved_mb"] == row["by hand"]["saved_mb"] < row["eager"]["saved_mb"]
        assert row["fm half+cache"]["cache"]["decision"].startswith("on")

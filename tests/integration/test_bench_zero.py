"""`launch/bench_zero.py --cpu`: the benchmark's code paths (trainer launches per mode, the HF+PEFT peer under
accelerate + DeepSpeed, the census column, the report and its JSON) on CPU ranks, as CI can run them."""

import json
import subprocess
import sys

import pytest
from _support import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_bench_zero_runs_every_kind_of_row_on_cpu(tmp_path):
    out = tmp_path / "zero.md"
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "bench_zero.py"), "--cpu", "--modes",
                           "none,zero3,zero3@stage3_param_persistence_threshold=0", "--peers", "zero3",
                           "--warmup", "1", "--steps", "1", "--workdir", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {f"{r['kind']} {r['mode']}": r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert set(rows) == {"distsft none", "distsft zero3", "distsft zero3@stage3_param_persistence_threshold=0",
                         "HF+PEFT zero3"}
    for name, row in rows.items():
        assert row["rc"] == 0 and row["tokens_per_s"] > 0, (name, row)
    for name in ("distsft zero3", "distsft zero3@stage3_param_persistence_threshold=0"):
        assert rows[name]["ran_as"] == "deepspeed" and rows[name]["zero_stage"] == 3
        assert "lora 14/14" in rows[name]["census"], rows[name]["census"]  # the fused projections ran
        assert set(rows[name]["losses"]) == {1, 2} or set(rows[name]["losses"]) == {"1", "2"}
    text = out.read_text()
    assert "| distsft zero3 |" in text and "Provenance:" in text and "HF+PEFT zero3" in text

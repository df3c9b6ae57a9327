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


def test_bench_zero_repeats_rounds_and_summarises_against_the_partner(tmp_path):
    """`--repeat 2`: every trainer mode runs twice, in the given order each round; each DeepSpeed row gets
    its ratio to the partner without DeepSpeed of the same round, and the summary lists both rounds'."""
    out = tmp_path / "zero.md"
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "bench_zero.py"), "--cpu", "--modes", "none,zero3",
                           "--peers", "", "--repeat", "2", "--warmup", "1", "--steps", "1",
                           "--workdir", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["mode"], r["round"]) for r in rows] == [("none", 1), ("zero3", 1), ("none", 2), ("zero3", 2)]
    ratios = [z["tokens_per_s"] / n["tokens_per_s"] for n, z in (rows[0:2], rows[2:4])]
    text = out.read_text()
    assert "| distsft zero3 (round 2) |" in text and "Over 2 rounds" in text
    line = next(x for x in text.splitlines() if x.startswith("| zero3 | 2 |"))
    assert " / ".join(f"{x:.1%}" for x in ratios) in line, (line, ratios)
    assert (tmp_path / "work" / "runs" / "zero3_r1").is_dir() and (tmp_path / "work" / "runs" / "zero3_r2").is_dir()

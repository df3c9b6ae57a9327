"""`launch/bench_zero.py --cpu`: the benchmark's code paths (trainer launches per mode, the HF+PEFT peer under
accelerate + DeepSpeed, the census column, the report and its JSON) on CPU ranks, as CI can run them."""

import json
import subprocess
import sys

import pytest
from _support import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_bench_zero_runs_every_kind_of_row_on_cpu(tmp_path):
    """Trainer rows (no DeepSpeed; ZeRO-3 with a DeepSpeed setting changed by `@key=value`), two rounds of
    them (`--repeat 2`: the modes in the given order each round), and the HF+PEFT peer without DeepSpeed and
    under ZeRO-3 with recomputation (`+gc`: transformers' gradient checkpointing; its first decoder layer's
    MLP runs twice a step). Each DeepSpeed row gets its ratio to the row without DeepSpeed of the same round,
    and the summary lists both rounds' ratios."""
    out = tmp_path / "zero.md"
    z3 = "zero3@stage3_param_persistence_threshold=0"
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "bench_zero.py"), "--cpu", "--modes", f"none,{z3}",
                           "--peers", "none,zero3+gc", "--repeat", "2", "--warmup", "1", "--steps", "1",
                           "--workdir", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["kind"], r["mode"], r.get("round")) for r in rows] == [
        ("distsft", "none", 1), ("distsft", z3, 1), ("distsft", "none", 2), ("distsft", z3, 2),
        ("HF+PEFT", "none", None), ("HF+PEFT", "zero3+gc", None)]
    assert [r["layer_forwards_per_step"] for r in rows[4:]] == [1, 2]
    for row in rows:
        assert row["rc"] == 0 and row["tokens_per_s"] > 0, row
    for row in (rows[1], rows[3]):
        assert row["ran_as"] == "deepspeed" and row["zero_stage"] == 3
        assert "lora 14/14" in row["census"], row["census"]  # the fused projections ran
        # one rank: the layers kept whole after their first gather, the gradients straight to their slots
        assert "2 layers kept whole (one rank)" in row["census"], row["census"]
        assert "28 gradients straight to their partitions" in row["census"], row["census"]
        assert set(row["losses"]) == {1, 2} or set(row["losses"]) == {"1", "2"}
    ratios = [z["tokens_per_s"] / n["tokens_per_s"] for n, z in (rows[0:2], rows[2:4])]
    text = out.read_text()
    assert f"| distsft {z3} (round 2) |" in text and "Provenance:" in text and "HF+PEFT zero3+gc" in text
    line = next(x for x in text.splitlines() if x.startswith(f"| {z3} | 2 |"))
    assert " / ".join(f"{x:.1%}" for x in ratios) in line, (line, ratios)
    runs = tmp_path / "work" / "runs"
    assert (runs / "zero3_stage3_param_persistence_threshold-0_r1").is_dir()
    assert (runs / "zero3_stage3_param_persistence_threshold-0_r2").is_dir()

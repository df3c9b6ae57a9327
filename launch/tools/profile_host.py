"""Where a training step's host (CPU) time goes, on the GPU machine: the same model as launch/bench_e2e.py,
one step under cProfile (top functions by own time and by cumulative time), the host time to enqueue a
step against the step's wall time, and any host-device synchronisation inside the step
(torch.cuda.set_sync_debug_mode).

    python launch/tools/profile_host.py --qlora --gc --offload --case llama3-8b:2x2048
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    import bench_e2e
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", default="llama3-8b:2x2048")
    ap.add_argument("--provider", default="distsft")
    ap.add_argument("--gc", action="store_true")
    ap.add_argument("--offload", action="store_true")
    ap.add_argument("--qlora", action="store_true")
    ap.add_argument("--top", type=int, default=35)
    args = ap.parse_args()
    shape, bt = args.case.split(":")
    batch, seq = (int(v) for v in bt.split("x"))
    model, config, loss_fn = bench_e2e.build(args.provider, shape, args.gc, offload=args.offload, qlora=args.qlora)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    ids = torch.randint(0, config.vocab_size, (batch, seq), device="cuda")

    def step():
        loss = loss_fn(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    walls, enqueues = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        step()
        enqueues.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
    print(f"step wall {1e3 * min(walls):.1f} ms (min of 5), host returns after {1e3 * min(enqueues):.1f} ms")
    torch.cuda.set_sync_debug_mode("warn")
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step()
        torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    print(f"synchronising calls inside one step: {len(syncs)}", *sorted(set(syncs))[:10], sep="\n  ")
    prof = cProfile.Profile()
    prof.enable()
    step()
    prof.disable()
    torch.cuda.synchronize()
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(args.top)
        print("\n".join(line[:160] for line in buf.getvalue().splitlines() if line.strip()))


if __name__ == "__main__":
    main()

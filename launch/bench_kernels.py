"""Benchmark distsft's Triton kernels against PyTorch eager (the references), torch.compile of the
references and Liger-Kernel (optional), on Llama-3.1-8B and Qwen2.5-7B shapes, 16,384 tokens, bf16.

    python launch/bench_kernels.py --out launch/results/kernels_h100.md
    python launch/bench_kernels.py --out /tmp/k.md --shapes llama3-8b --kernels rms_norm rope --no-compile

Per kernel and provider: median time (triton.testing.do_bench, L2 flushed between runs) of the forward,
the backward and both; achieved bandwidth as a share of a device-to-device copy measured here (bytes
read + written, counting each input read once and each output written once); effective TFLOP/s of the
fused linear cross-entropy (4 N d V flops: logits and grad of hidden, frozen head); peak memory beyond
the inputs during forward + backward. Backward: timed on its own (retain_graph) where the provider
allows repeating it; for the losses, whose kernels compute gradients in the forward, bwd = (fwd+bwd) - fwd.
Two timings of the non-loss kernels: eager (what a host-bound loop sees: Python, autograd and launch
overheads included wherever they exceed the GPU's time) as the median of --rounds rounds interleaved
over the providers, and the same closures captured once in a CUDA graph and replayed (the GPU's work
alone: every kernel and allocation the op makes, no host overhead).
Writes a markdown table with provenance (GPU, versions, commit, date, command) to --out.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

try:  # the package as installed, else from this checkout (the GPU machine gets a bare copy)
    import distsft_kernels as K
except ImportError:
    import importlib.util

    _root = Path(__file__).resolve().parents[1]
    _spec = importlib.util.spec_from_file_location("distsft_kernels", _root / "kernels" / "__init__.py",
                                                   submodule_search_locations=[str(_root / "kernels")])
    K = importlib.util.module_from_spec(_spec)
    sys.modules["distsft_kernels"] = K
    _spec.loader.exec_module(K)
import distsft_kernels.reference as R  # noqa: E402

SHAPES = {  # one registry: hidden, q heads, kv heads, head dim, MLP width, vocab, RMSNorm eps
    "llama3-8b": dict(d=4096, hq=32, hkv=8, hd=128, inter=14336, vocab=128256, eps=1e-5),
    "qwen2.5-7b": dict(d=3584, hq=28, hkv=4, hd=128, inter=18944, vocab=152064, eps=1e-6),
}
KERNELS = ["rms_norm", "rms_norm_dw", "rope", "swiglu", "cross_entropy", "fused_linear_ce"]
PROVIDERS = ["torch", "compile", "liger", "ours"]
DT = torch.bfloat16


def _liger():
    try:
        import liger_kernel
        from liger_kernel.transformers import functional as L

        return L, getattr(liger_kernel, "__version__", None) or _dist_version("liger-kernel")
    except Exception as e:  # optional peer
        print(f"liger-kernel unavailable: {e}", file=sys.stderr)
        return None, None


def _dist_version(name):
    from importlib.metadata import version

    try:
        return version(name)
    except Exception:
        return None


def case(kernel: str, s: dict, n: int, L, dev="cuda"):
    """(inputs needing grad, providers {name: fn() -> outputs}, bytes {mode: int}, flops, loss_like, chains).

    chains (ops whose output has its input's shapes): (start() -> tensors, {name: step(tensors) -> tensors}),
    the op applied to its own output, as layers apply it one after another in a model (see measure_chain)."""
    e = 2  # bf16 bytes
    if kernel in ("rms_norm", "rms_norm_dw"):
        x = torch.randn(n, s["d"], device=dev, dtype=DT, requires_grad=True)
        w = (1 + 0.1 * torch.randn(s["d"], device=dev, dtype=DT)).requires_grad_(kernel == "rms_norm_dw")
        leaves = [x, w] if w.requires_grad else [x]
        eps = s["eps"]
        prov = {"torch": lambda: R.rms_norm_ref(x, w, eps), "ours": lambda: K.rms_norm(x, w, eps)}
        prov["compile"] = (torch.compile(R.rms_norm_ref, dynamic=False), lambda f: f(x, w, eps))
        if L:
            prov["liger"] = lambda: L.liger_rms_norm(x, w, eps, 0.0, "llama", False)
        nb = n * s["d"] * e
        steps = {"torch": lambda t: R.rms_norm_ref(t[0], w, eps), "ours": lambda t: K.rms_norm(t[0], w, eps)}
        steps["compile"] = lambda t: prov["compile"][0](t[0], w, eps)
        if L:
            steps["liger"] = lambda t: L.liger_rms_norm(t[0], w, eps, 0.0, "llama", False)
        return leaves, prov, {"fwd": 2 * nb, "bwd": 3 * nb}, None, False, (lambda: (x,), steps)
    if kernel == "rope":
        bsz, t = 4, n // 4
        q = torch.randn(bsz, t, s["hq"], s["hd"], device=dev, dtype=DT, requires_grad=True)  # (B, T, H, D)
        k = torch.randn(bsz, t, s["hkv"], s["hd"], device=dev, dtype=DT, requires_grad=True)
        pos = torch.arange(t, device=dev).remainder(1000).expand(bsz, t)  # packed: restarts every 1000
        inv = 1.0 / (500000.0 ** (torch.arange(0, s["hd"], 2, device=dev).float() / s["hd"]))
        emb = torch.cat([pos[..., None] * inv] * 2, -1)
        cos, sin = emb.cos().to(DT), emb.sin().to(DT)  # (B, T, D), as HF's rotary embedding returns
        # ours as the patched attention calls it: only the first halves of cos/sin read (they repeat; Liger
        # relies on the same)

        def hf(x):  # HF's (B, H, T, D) view of the projection's (B, T, H, D) output
            return x.transpose(1, 2)

        prov = {"torch": lambda: R.rope_ref(hf(q), hf(k), cos, sin),
                "ours": lambda: K.rope(hf(q), hf(k), cos, sin, duplicated_halves=True)}
        prov["compile"] = (torch.compile(R.rope_ref, dynamic=False), lambda f: f(hf(q), hf(k), cos, sin))
        if L:
            prov["liger"] = lambda: L.liger_rope(hf(q), hf(k), cos, sin)
        nb = n * (s["hq"] + s["hkv"]) * s["hd"] * e * 2 + 2 * n * s["hd"] * e
        steps = {"torch": lambda t: R.rope_ref(*t, cos, sin),
                 "ours": lambda t: K.rope(*t, cos, sin, duplicated_halves=True),
                 "compile": lambda t: prov["compile"][0](*t, cos, sin)}
        if L:
            steps["liger"] = lambda t: L.liger_rope(*t, cos, sin)
        return [q, k], prov, {"fwd": nb, "bwd": nb}, None, False, (lambda: (hf(q), hf(k)), steps)
    if kernel == "swiglu":
        g = torch.randn(n, s["inter"], device=dev, dtype=DT, requires_grad=True)
        u = torch.randn(n, s["inter"], device=dev, dtype=DT, requires_grad=True)
        # ours as the patched MLP calls it: gradients written over gate/up, as Liger does
        prov = {"torch": lambda: R.swiglu_ref(g, u), "ours": lambda: K.gated_activation(g, u, inplace_grads=True)}
        prov["compile"] = (torch.compile(R.swiglu_ref, dynamic=False), lambda f: f(g, u))
        if L:
            prov["liger"] = lambda: L.liger_swiglu(g, u)
        nb = n * s["inter"] * e
        return [g, u], prov, {"fwd": 3 * nb, "bwd": 5 * nb}, None, False, None
    targets = torch.randint(0, s["vocab"], (n,), device=dev)
    targets[::8] = -100
    if kernel == "cross_entropy":
        z = (4 * torch.randn(n, s["vocab"], device=dev, dtype=DT)).requires_grad_()
        prov = {"torch": lambda: R.cross_entropy_ref(z, targets),
                "ours": lambda: K.cross_entropy(z, targets, inplace=True)}
        prov["compile"] = (torch.compile(R.cross_entropy_ref, dynamic=False), lambda f: f(z, targets))
        if L:
            prov["liger"] = lambda: L.liger_cross_entropy(z, targets, reduction="sum")
        nb = n * s["vocab"] * e
        return [z], prov, {"fwd": nb, "fwd+bwd": 2 * nb}, None, True, None
    # fused linear cross-entropy, frozen head (LoRA)
    h = torch.randn(n, s["d"], device=dev, dtype=DT, requires_grad=True)
    w = torch.randn(s["vocab"], s["d"], device=dev, dtype=DT) / s["d"] ** 0.5 * 3
    prov = {"torch": lambda: R.fused_linear_cross_entropy_ref(h, w, targets),
            "ours": lambda: K.fused_linear_cross_entropy(h, w, targets)}
    prov["compile"] = (torch.compile(R.fused_linear_cross_entropy_ref, dynamic=False), lambda f: f(h, w, targets))
    if L:
        prov["liger"] = lambda: L.liger_fused_linear_cross_entropy(h, w, targets, reduction="sum")
    return [h], prov, {}, 4 * n * s["d"] * s["vocab"], True, None


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def measure(fn, leaves, loss_like, do_bench):
    """{'fwd', 'bwd', 'fwd+bwd': ms, 'bwd_derived': bool, 'mem': MiB}.

    Each timed closure runs the op `reps` times back to back (10 unless one run takes > 5 ms), as a
    training step queues kernels: the launch and autograd overheads on the CPU overlap the GPU's work
    instead of being timed as idle GPU, and the L2 flush of do_bench happens once per closure. Output
    gradients are drawn once, outside the timing. The backward alone is timed with retain_graph; where
    a provider cannot repeat its backward (gradients written over its saved inputs) or computes its
    gradients in the forward (the losses), bwd = (fwd+bwd) - fwd.
    """
    first = [o for o in _as_tuple(fn()) if o.is_floating_point() and o.requires_grad]
    grads = [torch.randn_like(o) if o.dim() else torch.ones_like(o) for o in first]
    del first

    def fwd_bwd():
        outs = [o for o in _as_tuple(fn()) if o.is_floating_point() and o.requires_grad]
        torch.autograd.grad(outs, leaves, grads)

    reps = 1 if do_bench(fwd_bwd) > 5 else 10

    def repeated(f):
        return lambda: [f() for _ in range(reps)]

    res = {"fwd": do_bench(repeated(fn)) / reps, "fwd+bwd": do_bench(repeated(fwd_bwd)) / reps}
    res["bwd_derived"] = loss_like
    if not loss_like:
        outs = [o for o in _as_tuple(fn()) if o.is_floating_point() and o.requires_grad]

        def bwd():
            torch.autograd.grad(outs, leaves, grads, retain_graph=True)

        try:
            bwd()
            bwd()
            res["bwd"] = do_bench(repeated(bwd)) / reps
        except RuntimeError:  # e.g. ours with inplace_grads: the saved inputs hold the last gradients
            res["bwd_derived"] = True
        del outs
    if res["bwd_derived"]:
        res["bwd"] = res["fwd+bwd"] - res["fwd"]
    if not torch.cuda.is_available():  # --smoke
        res["mem"] = float("nan")
        return res
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    res["mem"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return res


def measure_chain(start, step, leaves, do_bench, reps=10) -> float:
    """ms per backward of `reps` applications of the op chained (each applied to the previous one's output)
    and backpropagated by one autograd call, as a model's backward runs them: per node, the engine's
    scheduling and the op's own backward, but the fixed cost of entering the engine (~140 us on the lent
    host, more than a RoPE backward's GPU time) once for all of them, as once per training step."""
    t = start()
    for _ in range(reps):
        t = _as_tuple(step(t))
    outs = [o for o in t if o.requires_grad]
    grads = [torch.randn_like(o) for o in outs]

    def bwd():
        torch.autograd.grad(outs, leaves, grads, retain_graph=True)

    bwd()
    bwd()
    return do_bench(bwd) / reps


def graph_time(f, do_bench, stream) -> float:
    """ms of f() captured once in a CUDA graph on `stream` (warmed up there first) and replayed."""
    with torch.cuda.stream(stream):
        f()
    stream.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=stream):
        f()
    torch.cuda.synchronize()
    ms = do_bench(g.replay)
    del g
    return ms


def measure_graph(fn, leaves, do_bench, reps=10):
    """{'fwd', 'bwd', 'fwd+bwd': ms} of the closures of `measure`, each captured in a CUDA graph (reps runs
    per graph). Everything runs on one side stream, so the backward (on its forward's stream) is captured."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        first = [o for o in _as_tuple(fn()) if o.is_floating_point() and o.requires_grad]
        grads = [torch.randn_like(o) if o.dim() else torch.ones_like(o) for o in first]
        del first

    def run(f):
        return lambda: [f() for _ in range(reps)]

    def fwd_bwd():
        torch.autograd.grad([o for o in _as_tuple(fn()) if o.is_floating_point() and o.requires_grad], leaves, grads)

    res = {"fwd": graph_time(run(fn), do_bench, stream) / reps,
           "fwd+bwd": graph_time(run(fwd_bwd), do_bench, stream) / reps}
    with torch.cuda.stream(stream):
        outs = [o for o in _as_tuple(fn()) if o.is_floating_point() and o.requires_grad]
    try:
        res["bwd"] = graph_time(run(lambda: torch.autograd.grad(outs, leaves, grads, retain_graph=True)), do_bench,
                                stream) / reps
    except RuntimeError:  # a backward that cannot be repeated (fails in the eager warm-up, before capture)
        res["bwd"] = res["fwd+bwd"] - res["fwd"]
    torch.cuda.synchronize()
    return res


def median_of(rounds: list[dict]) -> dict:
    """Per-key median over rounds of `measure` (the flags and memory of the last round)."""
    res = dict(rounds[-1])
    for key in ("fwd", "bwd", "fwd+bwd", "bwd_chain"):
        if all(key in r for r in rounds):
            res[key] = statistics.median(r[key] for r in rounds)
    return res


def copy_bandwidth(do_bench) -> float:
    """Device-to-device copy, bytes read + written per second."""
    if not torch.cuda.is_available():  # --smoke
        return 1e9
    src = torch.empty(2**30 // 2, dtype=DT, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 2 / (ms * 1e-3)


def provenance(argv) -> list[str]:
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                               cwd=Path(__file__).parent).stdout.strip()
        commit += "+dirty" if dirty else ""
    except Exception:
        commit = os.environ.get("DISTSFT_COMMIT", "unknown")
    return [
        f"- GPU: {torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).multi_processor_count} SMs)"
        if torch.cuda.is_available() else "- GPU: none (--smoke on CPU: the numbers mean nothing)",
        f"- torch {torch.__version__}, triton {triton.__version__}, liger-kernel {_liger()[1]}, "
        f"CUDA {torch.version.cuda}, Python {sys.version.split()[0]}",
        f"- commit: {commit}",
        f"- date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- command: `{' '.join(['python', *argv])}`",
    ]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="markdown file to write")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--kernels", nargs="+", default=KERNELS, choices=KERNELS)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--providers", nargs="+", default=PROVIDERS, choices=PROVIDERS)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    ap.add_argument("--no-liger", action="store_true")
    ap.add_argument("--rounds", type=int, default=3,
                    help="eager timings of the non-loss kernels: median of this many rounds over the providers")
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph (device time) timings")
    ap.add_argument("--smoke", action="store_true",
                    help="check this script on CPU (TRITON_INTERPRET=1, tiny shapes, no peers, host timer)")
    args = ap.parse_args(argv)
    dev = "cpu" if args.smoke else "cuda"
    if args.smoke:
        import time

        for s in SHAPES.values():
            s.update(d=s["d"] // 64, hq=s["hq"] // 4, hkv=max(1, s["hkv"] // 4), hd=16, inter=s["inter"] // 64,
                     vocab=s["vocab"] // 256)
        args.tokens, args.no_compile, args.no_liger, args.no_graph, args.rounds = 64, True, True, True, 1

        def do_bench(fn):
            fn()
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
    elif not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU (or --smoke)")
    else:
        from triton.testing import do_bench as _do_bench

        def do_bench(fn):
            return _do_bench(fn, warmup=25, rep=200, return_mode="median")

    L = None if args.no_liger or "liger" not in args.providers else _liger()[0]
    if "compile" in args.providers:  # the backward is timed alone with retain_graph, which donated buffers forbid
        from torch._functorch import config as functorch_config

        functorch_config.donated_buffer = False
    bw = copy_bandwidth(do_bench)
    print(f"device-to-device copy: {bw / 1e9:.0f} GB/s", flush=True)
    rows, results = [], {}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    head = ["# Kernel benchmarks", "", *provenance(sys.argv if argv is None else ["launch/bench_kernels.py", *argv]),
            f"- tokens: {args.tokens}, dtype bf16; copy bandwidth measured here: {bw / 1e9:.0f} GB/s "
            "(read + write)", "",
            "- each time: median of do_bench over closures running the op 10x back to back (1x if > 5 ms); "
            f"eager: median of {args.rounds} rounds interleaved over the providers (losses: 1 round); "
            "graph: the same closures captured once in a CUDA graph and replayed (device time, no host "
            "overhead; not for the losses); BW: share of the copy bandwidth at the fewest bytes the op must "
            "move; `*`: bwd = (fwd+bwd) - fwd (gradients made in the forward, or a backward that cannot be repeated); "
            "chained bwd (rms_norm, rope): 10 applications of the op, each on the previous one's output, "
            "backpropagated by one autograd call, per application (eager, median of the rounds)",
            "- rms_norm: frozen weight (LoRA; no dw), rms_norm_dw: trainable weight; rope: 4 x 4096 tokens, "
            "HF layout (B, H, T, D) over (B, T, H, D) memory; cross_entropy: materialised bf16 logits; "
            "fused_linear_ce: frozen head, TFLOP/s counts 4 N d V; losses: reduction sum, 1/8 of targets ignored",
            "",
            "| kernel | shape | provider | fwd ms | bwd ms | fwd+bwd ms | fwd BW | bwd BW | graph fwd ms "
            "| graph bwd ms | graph fwd+bwd ms | graph fwd BW | graph bwd BW | chained bwd ms | chained bwd BW "
            "| TFLOP/s | peak extra MiB |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for kernel in args.kernels:  # kernel-major: a run cut short keeps whole kernels, both shapes
        for shape in args.shapes:
            leaves, prov, nbytes, flops, loss_like, chain = case(kernel, SHAPES[shape], args.tokens, L, dev)
            fns = {}
            for name in args.providers:
                if name not in prov or (name == "compile" and args.no_compile):
                    continue
                fn = prov[name]
                fns[name] = (lambda f, call: (lambda: call(f)))(*fn) if isinstance(fn, tuple) else fn
            rounds = {name: [] for name in fns}
            for _ in range(1 if loss_like else args.rounds):  # interleaved: slow phases of the host hit all
                for name, fn in fns.items():
                    if name in rounds and rounds[name] is not None:
                        try:
                            rounds[name].append(measure(fn, leaves, loss_like, do_bench))
                            if chain and name in chain[1]:
                                try:
                                    rounds[name][-1]["bwd_chain"] = measure_chain(chain[0], chain[1][name], leaves,
                                                                                  do_bench)
                                except RuntimeError as e:  # a provider whose op cannot take its own output
                                    print(f"{kernel} {shape} {name} chained: {e}", file=sys.stderr, flush=True)
                        except Exception as e:  # a peer that fails on a shape must not end the run
                            print(f"{kernel} {shape} {name}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                            rows.append(f"| {kernel} | {shape} | {name} | error: {type(e).__name__} |" + " |" * 11)
                            rounds[name] = None
            for name, fn in fns.items():
                if not rounds[name]:
                    continue
                r = median_of(rounds[name])
                if not (loss_like or args.no_graph):
                    try:
                        r["graph"] = measure_graph(fn, leaves, do_bench)
                    except Exception as e:  # noqa: BLE001 (a provider that cannot be captured keeps its eager row)
                        print(f"{kernel} {shape} {name} graph: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                results[(kernel, shape, name)] = r
                rows.append(table_row(kernel, shape, name, r, nbytes, flops, bw))
                print(rows[-1], flush=True)
                out.write_text("\n".join(head + rows + ["", *targets(results, args, bw)]) + "\n")  # partial survives
            del leaves, prov, fns
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    out.write_text("\n".join(head + rows + ["", *targets(results, args, bw)]) + "\n")
    print("\n".join(targets(results, args, bw)))


def table_row(kernel, shape, name, r, nbytes, flops, bw) -> str:
    def share(res, mode):
        if mode in nbytes and res.get(mode, 0) > 0:
            return f"{nbytes[mode] / (res[mode] * 1e-3) / bw:.0%}"
        return ""

    star = "*" if r["bwd_derived"] else ""
    bwd_bw = (share(r, "bwd") and share(r, "bwd") + star) or share(r, "fwd+bwd") and f"{share(r, 'fwd+bwd')} (f+b)"
    g = r.get("graph")
    graph = (f"{g['fwd']:.3f} | {g['bwd']:.3f} | {g['fwd+bwd']:.3f} | {share(g, 'fwd')} | {share(g, 'bwd')}"
             if g else " | | | | ")
    tflops = f"{flops / (r['fwd+bwd'] * 1e-3) / 1e12:.0f}" if flops else ""
    chained = (f"{r['bwd_chain']:.3f} | {nbytes['bwd'] / (r['bwd_chain'] * 1e-3) / bw:.0%}"
               if "bwd_chain" in r and "bwd" in nbytes else " | ")
    return (f"| {kernel} | {shape} | {name} | {r['fwd']:.3f} | {r['bwd']:.3f}{star} | {r['fwd+bwd']:.3f} "
            f"| {share(r, 'fwd')} | {bwd_bw} | {graph} | {chained} | {tflops} | {r['mem']:.0f} |")


def targets(results, args, bw) -> list[str]:
    """The issue's targets, checked on this run's numbers: eager (host overhead included) and graph (device)."""
    lines = ["## Targets (this run)", ""]
    goals = {"rms_norm": (0.85, 0.75), "rope": (0.80, 0.80), "swiglu": (0.88, 0.80)}

    def verdict(value, goal):
        return f"{value:.0%} {'ok' if value >= goal else 'MISSED'}"

    for shape in args.shapes:
        s = SHAPES[shape]
        for kernel, (f_goal, b_goal) in goals.items():
            r = results.get((kernel, shape, "ours"))
            if r is None:
                continue
            n = args.tokens
            if kernel == "rms_norm":
                nb = {"fwd": 2 * n * s["d"] * 2, "bwd": 3 * n * s["d"] * 2}
            elif kernel == "rope":
                one = n * (s["hq"] + s["hkv"]) * s["hd"] * 2 * 2 + 2 * n * s["hd"] * 2
                nb = {"fwd": one, "bwd": one}
            else:
                nb = {"fwd": 3 * n * s["inter"] * 2, "bwd": 5 * n * s["inter"] * 2}
            line = f"- {kernel} {shape} (goal fwd {f_goal:.0%}, bwd {b_goal:.0%}):"
            for label, t in (("eager", r), ("graph", r.get("graph"))):
                if t:
                    line += (f" {label} fwd {verdict(nb['fwd'] / (t['fwd'] * 1e-3) / bw, f_goal)}, "
                             f"bwd {verdict(nb['bwd'] / (t['bwd'] * 1e-3) / bw, b_goal)};")
            if "bwd_chain" in r:
                line += f" chained bwd {verdict(nb['bwd'] / (r['bwd_chain'] * 1e-3) / bw, b_goal)};"
            lines.append(line.rstrip(";"))
        for kernel in KERNELS:
            ours, liger = results.get((kernel, shape, "ours")), results.get((kernel, shape, "liger"))
            if ours and liger:
                line = f"- {kernel} {shape} fwd+bwd vs Liger:"
                for label, o, li in (("eager", ours, liger), ("graph", ours.get("graph"), liger.get("graph"))):
                    if o and li:
                        line += (f" {label} {o['fwd+bwd']:.3f} vs {li['fwd+bwd']:.3f} ms "
                                 f"{'ok' if o['fwd+bwd'] <= li['fwd+bwd'] else 'SLOWER'};")
                if "bwd_chain" in ours and "bwd_chain" in liger:
                    o, li = ours["fwd"] + ours["bwd_chain"], liger["fwd"] + liger["bwd_chain"]
                    line += f" fwd + chained bwd {o:.3f} vs {li:.3f} ms {'ok' if o <= li else 'SLOWER'};"
                lines.append(line.rstrip(";"))
        r = results.get(("fused_linear_ce", shape, "ours"))
        if r:
            tf = 4 * args.tokens * s["d"] * s["vocab"] / (r["fwd+bwd"] * 1e-3) / 1e12
            lines.append(f"- fused_linear_ce {shape}: {tf:.0f} TFLOP/s (goal 500) {'ok' if tf >= 500 else 'MISSED'}, "
                         f"peak extra {r['mem']:.0f} MiB (goal <= 1024) {'ok' if r['mem'] <= 1024 else 'MISSED'}")
    return lines


if __name__ == "__main__":
    main()

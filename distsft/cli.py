"""The `distsft` command.

    distsft train [--config run.yaml] [section.key=value ...]        the training loop, one process
    distsft train --nproc_per_node 8 --config run.yaml ...            N processes on this node (torchrun's agent)
    distsft train --nnodes 2 --node_rank 0 --master_addr n0 ...       one node of several
    distsft train --help | --print-config                             every config key; the resolved config
    distsft data  --config run.yaml [--show 3]                        what the data becomes (python -m distsft.data)
    distsft plot  outputs/run                                         redraw training_curves.png
    distsft merge outputs/run/adapter outputs/run/merged              adapter + base -> a plain HF model
    distsft generate outputs/run/adapter --prompt "..."               a few prompts through base + adapter
    distsft chat  outputs/run/adapter                                 the same, interactively
    distsft env                                                       versions and devices, for a bug report

Exit codes (`distsft train` keeps them under every mode, one process or many; `accelerate launch` does not,
see README): 0 finished; 2 bad configuration or input (one line `distsft: error: <key>: ...` on stderr,
before any work where it can be known); 65 diverged (non-finite losses, do not retry); 75 preempted
(SIGTERM/SIGUSR1 at any moment: in training after committing a checkpoint, outside it at once, see
distsft/lifecycle.py; run again with checkpoint.resume_from_checkpoint=auto); 1 a crash (its traceback
above). `DISTSFT_TRACEBACK=1` shows the traceback of an input error too.

Nothing heavy is imported before the arguments are parsed and validated: torch, peft and bitsandbytes print
on import, and a typo must end in one line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from distsft.config import Config
from distsft.entry import CRASH_EXIT_CODE, USAGE_EXIT_CODE, error, parse_command_line, run_to_exit

TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"


# ----------------------------------------------------------------------------------------------------
# The launcher: N processes through torchrun's agent, the trainer's exit code and one line out


def _worst(records: list[dict]) -> dict | None:
    """The outcome to report among the ranks' records: the earliest that is not a success, since what
    follows it is its consequence (a rank that stops makes torchrun SIGTERM the others, and their
    collectives fail: a crash on one rank makes the others report 75, a preemption before the loop on
    one makes the others crash). Ties (or records without a time): an error or a divergence over a
    preemption, the lowest rank first."""
    from distsft.lifecycle import REQUEUE_EXIT_CODE

    failed = [r for r in records if r["exit_code"] != 0]
    if not failed:
        return records[0] if records else None
    return min(failed, key=lambda r: (r.get("time", 0.0), r["exit_code"] == REQUEUE_EXIT_CODE, r["rank"]))


def _launch(cfg: Config, args: argparse.Namespace, worker_argv: list[str]) -> int:
    """Start the ranks of this node with torchrun's elastic agent (in this process, as `torchrun` does) and
    return the trainer's exit code: each rank leaves its outcome in a status directory, because the agent
    reports any failure as one exception and a signal to it as another."""
    import logging
    import shutil
    import tempfile

    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from distsft.lifecycle import REQUEUE_EXIT_CODE

    status_dir = Path(tempfile.mkdtemp(prefix="distsft-status-"))
    os.environ["DISTSFT_STATUS_DIR"] = str(status_dir)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default, without its banner
    # The agent forwards the signals it handles to the ranks (and gives them 30 s): SIGUSR1 is a preemption
    # signal too (Slurm's --signal=USR1@...), which torchrun's default list leaves out.
    os.environ.setdefault("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
    argv = ["--nproc_per_node", str(args.nproc_per_node or 1), "--nnodes", str(args.nnodes),
            "--node_rank", str(args.node_rank)]
    for name in ("master_addr", "master_port", "rdzv_backend", "rdzv_endpoint", "rdzv_id"):
        if getattr(args, name) is not None:
            argv += [f"--{name}", str(getattr(args, name))]
    if args.nnodes in ("1", "1:1") and args.rdzv_endpoint is None and args.master_addr is None:
        argv.append("--standalone")
    argv += [str(TRAIN_SCRIPT), *worker_argv]
    # The agent narrates (rendezvous, "Received 15 death signal", "failed (exitcode: 2)") through loggers that
    # each set their own level: quiet every one of them; the outcome is reported below, once.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    code, signalled = 0, None
    try:
        torchrun.run(torchrun.get_args_parser().parse_args(argv))
    except ChildFailedError as e:
        codes = sorted((f.local_rank, f.exitcode) for f in e.failures.values())
        code = next((c for _, c in codes if c != 0), CRASH_EXIT_CODE)
        code = 128 - code if code < 0 else code  # killed by a signal: the shell's convention
    except SignalException as e:
        signalled = int(e.sigval)
        code = 128 + signalled
    records = [json.loads(p.read_text()) for p in sorted(status_dir.glob("rank-*.json"))]
    shutil.rmtree(status_dir, ignore_errors=True)
    worst = _worst(records)
    if worst is not None and (code != 0 or worst["exit_code"] != 0):
        code = worst["exit_code"]
        if worst["message"] and code != REQUEUE_EXIT_CODE:
            error(f"rank {worst['rank']}: {worst['message']}" if worst["reason"] == "crash" else worst["message"])
    elif code != 0:
        why = f"signal {signalled}" if signalled else f"exit code {code}"
        error(f"a rank ended with {why} before reporting why (its output is above)")
    return code


def train_main(argv: list[str] | None = None) -> int:
    """`distsft train`: validate everything that can be validated (config, paths, tokenizer, trackers,
    output directory) in this process, then train here (one process, or a rank an outer launcher started)
    or start this node's ranks."""
    from distsft.lifecycle import PREEMPTION

    PREEMPTION.install()  # a signal from here on ends with 75 and a status record (torchrun's agent takes over)
    cfg, args = parse_command_line(argv, "distsft train", launcher=True)
    world = args.nproc_per_node or 1
    multi = (world > 1 or args.nnodes not in ("1", "1:1")) and "RANK" not in os.environ
    if not multi:
        from distsft.train import main

        run_to_exit(main, cfg)
        return 0
    from distsft.preflight import preflight

    try:
        cfg = preflight(cfg)  # once, before any rank starts; the ranks repeat it (it writes nothing)
    except ValueError as e:
        error(str(e))
        return USAGE_EXIT_CODE
    worker_argv = ([f"--config={args.config}"] if args.config else []) + list(args.overrides)
    # As resolved here, for every rank; quoted, so that YAML reads it back as this very string.
    worker_argv.append(f"train.output_dir={json.dumps(cfg.train.output_dir)}")
    return _launch(cfg, args, worker_argv)


# ----------------------------------------------------------------------------------------------------
# The other subcommands


def _adapter_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("adapter", help="an adapter directory (<output_dir>/adapter, or a checkpoint's adapter/)")
    p.add_argument("--base", help="the base model (default: the one the adapter names)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    return p


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def merge_main(argv: list[str] | None = None) -> int:
    p = _adapter_parser("distsft merge", "adapter + base -> a plain Hugging Face model with the update merged in "
                                         "(any run's adapter, ZeRO-3 included; a QLoRA adapter is merged into "
                                         "its dequantized base)")
    p.add_argument("out", help="output directory (must not exist or be empty)")
    args = p.parse_args(argv)
    from distsft.export import merge_adapter

    out = merge_adapter(args.adapter, args.out, base=args.base, dtype=args.dtype, device=_device(args.device))
    print(out)
    return 0


def generate_main(argv: list[str] | None = None, *, chat: bool = False) -> int:
    name = "chat" if chat else "generate"
    p = _adapter_parser(f"distsft {name}", "talk to base + adapter, to check a run by eye" if chat else
                        "a few prompts through base + adapter (greedy unless --temperature), to check a run by eye")
    if not chat:
        p.add_argument("--prompt", action="append", required=True, help="a user message (repeatable)")
    p.add_argument("--system", help="a system message")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-adapter", action="store_true", help="the base model alone, for comparison")
    args = p.parse_args(argv)
    from distsft.inference import Generator

    gen = Generator(args.adapter, base=args.base, dtype=args.dtype, device=_device(args.device),
                    use_adapter=not args.no_adapter)
    kw = dict(system=args.system, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    if not chat:
        for prompt in args.prompt:
            print(f">>> {prompt}\n{gen.reply([{'role': 'user', 'content': prompt}], **kw)}\n", flush=True)
        return 0
    history: list[dict[str, str]] = []
    print("empty line or Ctrl-D ends; /reset starts over", file=sys.stderr)
    while True:
        try:
            line = input(">>> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": line})
        answer = gen.reply(history, **kw)
        history.append({"role": "assistant", "content": answer})
        print(answer, flush=True)
    return 0


def env_main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="distsft env", description="versions and devices, for a bug report").parse_args(argv)
    from distsft.inference import environment_report

    print(environment_report())
    return 0


def _data_main(argv: list[str]) -> int:
    from distsft.data.__main__ import main as data_main

    return data_main(argv)


def _plot_main(argv: list[str]) -> int:
    from distsft.plots import main as plot_main

    return plot_main(argv)


COMMANDS = {
    "train": ("train a LoRA adapter (the loop of distsft/train.py); --help lists every config key", train_main),
    "data": ("what a dataset becomes: rows, rejections, tokens, packing; pre-builds the cache", _data_main),
    "plot": ("redraw a run's training_curves.png from its metrics.jsonl", _plot_main),
    "merge": ("adapter + base -> a plain Hugging Face model", merge_main),
    "generate": ("a few prompts through base + adapter", generate_main),
    "chat": ("talk to base + adapter", lambda argv: generate_main(argv, chat=True)),
    "env": ("versions and devices, for a bug report", env_main),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        text = "\n".join(["usage: distsft <command> [options]   (distsft <command> --help for its options)", "",
                          *(f"  {name:<{width}}  {what}" for name, (what, _) in COMMANDS.items())])
        if argv and argv[0] not in ("-h", "--help"):
            print(text, file=sys.stderr)
            error(f"unknown command {argv[0]!r}")
            return USAGE_EXIT_CODE
        print(text)
        return 0 if argv else USAGE_EXIT_CODE
    name, rest = argv[0], argv[1:]
    if name in ("merge", "generate", "chat"):
        from distsft.logs import quiet_libraries

        quiet_libraries()
    try:
        return COMMANDS[name][1](rest)
    except (ValueError, OSError) as e:  # a bad path or adapter in merge/generate/data: one line
        if name == "train" or os.environ.get("DISTSFT_TRACEBACK"):
            raise
        error(str(e))
        return USAGE_EXIT_CODE


def console_main() -> None:
    """The `distsft` console script."""
    sys.exit(main())


def train_console_main() -> None:
    """The `distsft-train` console script (the same as `distsft train`)."""
    sys.exit(train_main())


if __name__ == "__main__":
    console_main()

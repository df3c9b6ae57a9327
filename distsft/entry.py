"""A training process's entry: its command line and its exit code, for `distsft/train.py` run as a script,
`distsft train` (distsft/cli.py) and the benchmark launchers. Below the trainer: the loop is handed in
(`run_to_exit(main, cfg)`), so nothing here imports distsft.train.

    cfg = parse_args()            # a validated Config, or exit 2 with one line; --help lists every config key
    run_to_exit(main, cfg)        # train; exit 0, 2, 65, 75 or 1 (distsft/cli.py's docstring says when)

Nothing heavy is imported before the arguments are parsed and validated: torch, peft and bitsandbytes print
on import, and a typo must end in one line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from collections.abc import Callable
from typing import TYPE_CHECKING

from distsft.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from transformers.trainer_utils import TrainOutput

USAGE_EXIT_CODE = 2  # bad configuration or input: argparse's code for a bad command line
CRASH_EXIT_CODE = 1


# ----------------------------------------------------------------------------------------------------
# Config reference (`--help`)


def _field_docs() -> dict[str, dict[str, str]]:
    """Attribute docstrings of the config dataclasses, by class and field (Python keeps none at runtime)."""
    import ast
    import inspect

    import distsft.config as config_module

    docs: dict[str, dict[str, str]] = {}
    for node in ast.parse(inspect.getsource(config_module)).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = docs.setdefault(node.name, {})
        for a, b in zip(node.body, node.body[1:], strict=False):
            if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                    and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
                fields[a.target.id] = inspect.cleandoc(b.value.value)
    return docs


def _yaml_scalar(value) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def config_reference(width: int = 100) -> str:
    """Every section and key with its default and docstring, from the dataclasses themselves."""
    import dataclasses
    import typing

    from distsft.config import PRETRAINED_DEFAULTS, DataSourceConfig

    docs = _field_docs()
    lines = ["configuration keys (set with section.key=value, or in the YAML file of --config):"]

    def describe(cls, prefix: str, section: str | None, indent: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = "(required)"
            if dataclasses.is_dataclass(default) or (isinstance(default, list) and default
                                                     and dataclasses.is_dataclass(default[0])):
                default = dataclasses.asdict(default) if dataclasses.is_dataclass(default) else [
                    dataclasses.asdict(d) for d in default]
            text = f"{indent}{prefix}{f.name} = {default if default == '(required)' else _yaml_scalar(default)}"
            pretrained = PRETRAINED_DEFAULTS.get(section or "", {}).get(f.name)
            if pretrained is not None:
                text += f"   (with model.name_or_path: {_yaml_scalar(pretrained)})"
            lines.append(text)
            doc = docs.get(cls.__name__, {}).get(f.name)
            if doc:
                lines.extend(textwrap.wrap(" ".join(doc.split()), width=width, initial_indent=indent + "    ",
                                           subsequent_indent=indent + "    "))
            if hints[f.name] == list[DataSourceConfig]:
                lines.append(f"{indent}    each source:")
                describe(DataSourceConfig, f"{prefix}{f.name}.N.", None, indent + "      ")

    for f in dataclasses.fields(Config):
        lines.append("")
        lines.append(f"{f.name}:")
        describe(f.default_factory().__class__, f"{f.name}.", f.name, "  ")
    return "\n".join(lines)


class _HelpWithConfig(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.print_help()
        print()
        print(config_reference())
        parser.exit()


# ----------------------------------------------------------------------------------------------------
# Parsing a training command line


def _train_parser(prog: str, launcher: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, add_help=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="LoRA supervised fine-tuning. With no arguments, trains the embedded tiny demo.",
        epilog="Overrides: section.key=value, e.g. train.learning_rate=1e-4 data.max_seq_len=2048. Exit codes: 0 "
               "done, 2 bad config or input, 65 diverged, 75 preempted (resume with "
               "checkpoint.resume_from_checkpoint=auto), 1 crash.",
    )
    parser.add_argument("-h", "--help", action=_HelpWithConfig, help="show this help and every config key")
    parser.add_argument("--config", help="YAML run file (command-line overrides win)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    if launcher:
        group = parser.add_argument_group(
            "processes (torchrun's options; without them: one process, or the launcher's processes)")
        group.add_argument("--nproc_per_node", "--nproc-per-node", type=int, help="processes (GPUs) on this node")
        group.add_argument("--nnodes", default="1", help="number of nodes (or MIN:MAX)")
        group.add_argument("--node_rank", "--node-rank", type=int, default=0)
        group.add_argument("--master_addr", "--master-addr", help="address of node 0 (static rendezvous)")
        group.add_argument("--master_port", "--master-port", type=int)
        group.add_argument("--rdzv_backend", "--rdzv-backend", help="c10d for a rendezvous on --rdzv_endpoint")
        group.add_argument("--rdzv_endpoint", "--rdzv-endpoint", help="host:port")
        group.add_argument("--rdzv_id", "--rdzv-id", help="job id shared by every node")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, section.key=value")
    return parser


def _print_config(cfg: Config) -> None:
    import yaml

    from distsft.preflight import default_output_dir
    from distsft.redaction import redact_config

    if cfg.train.output_dir is None:
        cfg.train.output_dir = default_output_dir(cfg.model)
    print(yaml.safe_dump(redact_config(cfg.to_dict()), sort_keys=False), end="")


def parse_command_line(argv: list[str] | None, prog: str, launcher: bool) -> tuple[Config, argparse.Namespace]:
    """A training command line (`launcher`: with torchrun's process options, `distsft train`'s): a validated
    Config and the parsed arguments, or exit 2 with one line on stderr."""
    args = _train_parser(prog, launcher).parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        error(str(e))
        raise SystemExit(USAGE_EXIT_CODE) from None
    if args.print_config:
        _print_config(cfg)
        raise SystemExit(0)
    from distsft.logs import quiet_libraries

    quiet_libraries()  # before accelerate, DeepSpeed and bitsandbytes are imported (they print on import)
    return cfg, args


def parse_args(argv: list[str] | None = None) -> Config:
    """`distsft/train.py`'s command line (the processes are the launcher's): a validated Config, or exit 2
    with one line on stderr."""
    return parse_command_line(argv, "distsft/train.py", launcher=False)[0]


# ----------------------------------------------------------------------------------------------------
# Outcomes and exit codes


def error(message: str) -> None:
    print(f"distsft: error: {' '.join(message.split())}", file=sys.stderr, flush=True)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _report(exit_code: int, reason: str, message: str | None) -> None:
    """Tell the launcher why this rank ends (distsft.lifecycle.report_outcome); the trainer writes the
    preempted status file itself, with the step of its checkpoint."""
    from distsft.lifecycle import report_outcome

    report_outcome(exit_code, reason, message, status_file=reason != "preempted")


def _fail(exit_code: int, reason: str, message: str) -> None:
    """End this rank with `exit_code` and one line: printed here, or by the `distsft train` launcher,
    which prints one line for all its ranks."""
    message = " ".join(message.split())
    _report(exit_code, reason, message)
    if not os.environ.get("DISTSFT_STATUS_DIR"):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        error(f"rank {_rank()}: {message}" if world > 1 else message)
    raise SystemExit(exit_code)


def run(main: Callable[[Config], TrainOutput], cfg: Config) -> None:
    """Train in this process (a rank of whatever launcher started it) with `main` (distsft.train.main),
    mapping the outcome to the exit codes (distsft/cli.py). Input errors (ValueError and its kinds, a
    checkpoint that does not verify) are one line. A crash after a preemption signal reached this rank (a
    collective failing because a peer stopped for the same signal) is a preemption too: SystemExit(75)."""
    from distsft.checkpoint import CheckpointError
    from distsft.lifecycle import NONRETRYABLE_EXIT_CODE, PREEMPTION, REQUEUE_EXIT_CODE, TrainingDiverged

    try:
        out = main(cfg)
    except TrainingDiverged as e:
        _fail(NONRETRYABLE_EXIT_CODE, "diverged", str(e))
    except SystemExit as e:
        if e.code == REQUEUE_EXIT_CODE:
            _report(REQUEUE_EXIT_CODE, "preempted", None)
        raise
    except (ValueError, CheckpointError) as e:
        if os.environ.get("DISTSFT_TRACEBACK"):
            raise
        _fail(USAGE_EXIT_CODE, "error", str(e))
    except KeyboardInterrupt:
        raise
    except BaseException as e:
        if PREEMPTION.signum is not None:
            import logging

            from distsft.lifecycle import report_outcome

            message = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            logging.getLogger("distsft").warning("rank %d: %s after a preemption signal: exiting with %d",
                                                 _rank(), message, REQUEUE_EXIT_CODE)
            report_outcome(REQUEUE_EXIT_CODE, "preempted", message)
            raise SystemExit(REQUEUE_EXIT_CODE) from e
        _report(CRASH_EXIT_CODE, "crash", f"{type(e).__name__}: {e}")
        raise
    if _rank() == 0:
        print(json.dumps({"global_step": out.global_step, "training_loss": out.training_loss, **out.metrics}))


def run_to_exit(main: Callable[[Config], TrainOutput], cfg: Config) -> None:
    """`run(main, cfg)` as a whole process (distsft/train.py's, `distsft train`'s single process): after a
    preemption, exit at once with 75 on every rank, as after success (`exit_cleanly`)."""
    from distsft.lifecycle import REQUEUE_EXIT_CODE, exit_now

    try:
        run(main, cfg)
    except SystemExit as e:
        if e.code == REQUEUE_EXIT_CODE:
            exit_now(REQUEUE_EXIT_CODE)
        raise
    exit_cleanly()


def exit_cleanly(code: int = 0) -> None:
    """End a finished multi-process run without interpreter finalization. Everything is written and
    closed by now (checkpoints fsynced, trackers finished, process group destroyed), but about one
    DeepSpeed-on-gloo run in ten on CPU then aborted while native threads were torn down ("terminate
    called without an active exception", SIGABRT), which torchrun reports as a failed rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from distsft.lifecycle import exit_now

        exit_now(code)

"""Command line: parse and validate the run config before anything heavy is imported, so a bad key or
value ends the run with exactly one line on stderr (torch, peft and bitsandbytes print on import)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from distsft.config import Config, ConfigError, load_config


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(
        prog="distsft/train.py",
        description="LoRA SFT. With no arguments, trains the embedded tiny demo.",
        epilog="Overrides: section.key=value, e.g. train.learning_rate=1e-4 data.max_seq_len=2048",
    )
    parser.add_argument("--config", help="YAML run file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, section.key=value")
    args = parser.parse_args(argv)
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"distsft: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def run(cfg: Config) -> None:
    from distsft.distributed import NONRETRYABLE_EXIT_CODE, TrainingDiverged, write_exit_status
    from distsft.train import main

    try:
        out = main(cfg)
    except TrainingDiverged as e:
        print(f"distsft: error: {e}", file=sys.stderr)
        if int(os.environ.get("RANK", "0")) == 0:
            write_exit_status("diverged", NONRETRYABLE_EXIT_CODE)
        raise SystemExit(NONRETRYABLE_EXIT_CODE) from None
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"global_step": out.global_step, "training_loss": out.training_loss, **out.metrics}))


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))
    exit_cleanly()


def exit_cleanly(code: int = 0) -> None:
    """End a finished multi-process run without interpreter finalization. Everything is written and
    closed by now (checkpoints fsynced, trackers finished, process group destroyed), but about one
    DeepSpeed-on-gloo run in ten on CPU then aborted while native threads were torn down ("terminate
    called without an active exception", SIGABRT), which torchrun reports as a failed rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main()

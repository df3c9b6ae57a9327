"""What a run prints: distsft's own INFO lines on the main process, warnings and errors from everyone,
and none of the libraries' chatter that says nothing to the user.

    setup_logging(is_main=acc.is_main_process, rank=acc.process_index)   # once the rank is known

Libraries log INFO only when asked (`DISTSFT_VERBOSE=1` shows everything, every time). Silenced for good:
FutureWarning and DeprecationWarning (about the libraries' own internals, which a user does not call:
transformers' `is_gradient_checkpointing`, DeepSpeed's and torch's deprecated collectives, ...), and a few
UserWarnings known to be noise here (listed below, each with why). Any other warning prints once per
message, not once per step.
"""

from __future__ import annotations

import logging
import os
import warnings

# (message regex, why it says nothing to a distsft user)
NOISE = (
    (r".*ensure_weight_tying.*", "distsft sets peft's ensure_weight_tying itself where the tie matters"),
    (r".*Setting `save_embedding_layers`.*", "distsft saves adapters with save_embedding_layers=False"),
    (r".*torch\.utils\.checkpoint: the use_reentrant parameter.*", "distsft chooses its checkpoint explicitly"),
    (r".*None of the inputs have requires_grad=True.*", "frozen embeddings under recomputation: expected"),
    (r".*The given NumPy array is not writable.*", "read-only arrays from the tokenization cache, never written"),
    (r".*MatMul8bitLt: inputs will be cast.*", "bitsandbytes' note on its own casting"),
    (r".*Input type into Linear4bit is torch\.float16.*", "bitsandbytes' speed hint; the dtype is the run's"),
)
QUIET_LOGGERS = ("DeepSpeed", "deepspeed", "accelerate", "torch.distributed", "bitsandbytes", "peft", "datasets",
                 "matplotlib", "PIL", "httpx", "urllib3", "filelock", "wandb")


def quiet_libraries() -> None:
    """Warnings filters and library log levels for a training process (idempotent)."""
    if os.environ.get("DISTSFT_VERBOSE"):
        return
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():  # else DeepSpeed warns on import that it found no GPU
            os.environ["DS_ACCELERATOR"] = "cpu"
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for pattern, _ in NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_warning()
        hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards": one bar per rank and file
    except ImportError:
        pass


class _Once(logging.Filter):
    """Let each distinct message of a library through once (a per-step warning becomes one line)."""

    def __init__(self):
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "distsft" or record.name.startswith("distsft."):
            return True
        key = (record.name, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def setup_logging(*, is_main: bool, rank: int) -> None:
    """distsft's loggers at INFO on the main process (WARNING elsewhere); everything else at WARNING,
    each distinct message once."""
    verbose = bool(os.environ.get("DISTSFT_VERBOSE"))
    fmt = f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s"
    root = logging.getLogger()
    if not root.handlers:  # else someone else (an embedding program, pytest) owns the output
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(fmt))
        handler.addFilter(_Once())
        root.addHandler(handler)
        logging.captureWarnings(True)  # warnings through that handler: one line each, with the rank
    root.setLevel(logging.INFO if verbose and is_main else logging.WARNING)
    logging.getLogger("distsft").setLevel(logging.INFO if is_main else logging.WARNING)
    quiet_libraries()

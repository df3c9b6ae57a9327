"""Secrets kept out of every file and tracker a run writes to: by key (`api_key`, `hf_token`, `password`, ...),
by the values this process knows (the environment's tokens, the W&B key in netrc) and by shape (Hugging Face
and GitHub tokens). No distsft imports: config.py writes config.yaml through `redact_config`, the tracker
sends everything through `redact`.
"""

from __future__ import annotations

import netrc
import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

REDACTED = "***"

SECRET_ENV_VARS = (
    "WANDB_API_KEY",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_HUB_TOKEN",
    "HUGGINGFACEHUB_API_TOKEN",
)
_SECRET_WORDS = {"password", "passwd", "passphrase", "secret", "secrets", "apikey", "credential",
                 "credentials", "authorization", "cookie", "bearer"}
_SECRET_PAIRS = {("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key"),
                 ("auth", "key"), ("client", "secret")}
# `<x>_token` is a secret unless <x> names one of a tokenizer's special tokens.
_SPECIAL_TOKENS = {"pad", "eos", "bos", "unk", "sep", "cls", "mask", "additional", "special", "start",
                   "end", "image", "video", "audio", "boi", "eoi", "think", "chat", "decoder", "prefix",
                   "suffix", "middle", "eot", "eom", "fim", "tool", "system", "user", "assistant", "max",
                   "num", "n", "min", "first", "last"}
# Tokens recognisable by their shape alone: Hugging Face, GitHub (classic and fine-grained).
_TOKEN_VALUE = re.compile(r"\b(?:hf_[A-Za-z0-9]{30,}|gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{60,})\b")


def is_secret_key(key: Any) -> bool:
    """Whether a mapping key names a secret: api_key, token, hf_token, WANDB_API_KEY, password, ...
    (but not pad_token, tokenizer, max_tokens)."""
    snake = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(key)).lower()
    words = [w for w in re.split(r"[^a-z0-9]+", snake) if w]
    if not words:
        return False
    if any(w in _SECRET_WORDS for w in words):
        return True
    if any(pair in _SECRET_PAIRS for pair in zip(words, words[1:], strict=False)):
        return True
    if words[-1] == "token":
        return len(words) == 1 or words[-2] not in _SPECIAL_TOKENS
    return False


def netrc_wandb_keys() -> list[str]:
    """The W&B API keys that `wandb login` wrote to netrc (the file `NETRC` names, else ~/.netrc, ~/_netrc)."""
    paths = [os.environ["NETRC"]] if os.environ.get("NETRC") else [os.path.expanduser("~/.netrc"),
                                                                  os.path.expanduser("~/_netrc")]
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    keys = []
    for path in paths:
        try:
            auth = netrc.netrc(path).authenticators(host)
        except (OSError, netrc.NetrcParseError):
            continue
        if auth and auth[2]:
            keys.append(auth[2])
    return keys


def _known_secrets() -> list[str]:
    """The secret values this process knows: the environment's secret variables (`SECRET_ENV_VARS`) and
    the W&B API key that `wandb login` wrote to netrc (the usual place, with no variable set)."""
    values = [os.environ.get(k, "") for k in SECRET_ENV_VARS] + netrc_wandb_keys()
    return [v for v in values if v.strip()]


def _redact_str(s: str, known: list[str]) -> str:
    for v in known:
        if s == v or (len(v) >= 8 and v in s):
            s = s.replace(v, REDACTED)
    return _TOKEN_VALUE.sub(REDACTED, s)


def redact(obj: Any, *, by_key: bool = True) -> Any:
    """A copy of `obj` (nested dicts/lists/tuples/strings) with secrets replaced by "***": the value of
    every key that names a secret (see `is_secret_key`; not with `by_key=False`), every occurrence of a
    secret value this process knows (`_known_secrets`: the environment's, netrc's W&B key) inside any
    string, and strings shaped like a Hugging Face or GitHub token."""
    known = _known_secrets()

    def walk(x: Any) -> Any:
        if isinstance(x, Mapping):
            return {k: (REDACTED if by_key and is_secret_key(k) and v not in (None, "") else walk(v))
                    for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(walk(v) for v in x)
        if isinstance(x, str):
            return _redact_str(x, known)
        return x

    return walk(obj)


def redact_config(config_dict: dict[str, Any]) -> dict[str, Any]:
    """The resolved config as it may be written (config.yaml in the output directory, in every checkpoint
    and in the adapter; --print-config): secret values typed into any of its strings (a W&B note, a run
    name) replaced. By value only: its keys are the config's own (and a column named `token` in a
    `field_map` is no secret), so that the file still loads."""
    return redact(config_dict, by_key=False)

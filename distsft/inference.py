"""Looking at a run by eye, and describing the machine: `distsft generate`, `distsft chat`, `distsft env`.

    gen = Generator("outputs/demo/adapter")
    print(gen.reply([{"role": "user", "content": "What is 12 * 7?"}], max_new_tokens=64))
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path

import torch


class Generator:
    """Base + adapter (as `distsft.export.load_adapted` loads them), replying to chat messages through the
    tokenizer's chat template (the one training rendered the data with, saved beside the adapter)."""

    def __init__(self, adapter_dir: str | Path, *, base: str | None = None, dtype: str = "auto",
                 device: str = "cpu", use_adapter: bool = True):
        from distsft.export import load_adapted

        self.model, self.tokenizer = load_adapted(adapter_dir, base=base, dtype=dtype, device=device)
        self.use_adapter = use_adapter
        self.device = torch.device(device)

    def prompt_ids(self, messages: list[dict[str, str]], system: str | None = None) -> torch.Tensor:
        messages = ([{"role": "system", "content": system}] if system else []) + list(messages)
        if self.tokenizer.chat_template:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                     return_dict=True)["input_ids"]
        else:
            text = "\n".join(m["content"] for m in messages)
            ids = self.tokenizer(text, return_tensors="pt")["input_ids"]
        return ids.to(self.device)

    @torch.no_grad()
    def reply(self, messages: list[dict[str, str]], *, system: str | None = None, max_new_tokens: int = 256,
              temperature: float = 0.0) -> str:
        ids = self.prompt_ids(messages, system)
        sample = temperature > 0
        kw = dict(max_new_tokens=max_new_tokens, do_sample=sample, pad_token_id=self.tokenizer.pad_token_id,
                  eos_token_id=self.tokenizer.eos_token_id)
        if sample:
            kw["temperature"] = temperature
        else:  # greedy: the model's own generation_config must not switch sampling back on
            kw.update(temperature=None, top_p=None, top_k=None)
        if self.use_adapter:
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
        else:
            with self.model.disable_adapter():
                out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


PACKAGES = ("distsft", "torch", "triton", "transformers", "peft", "accelerate", "deepspeed", "bitsandbytes",
            "datasets", "tokenizers", "safetensors", "wandb", "tensorboard", "matplotlib", "numpy")


def _git_commit() -> str | None:
    repo = Path(__file__).resolve().parents[1]
    if not (repo / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment_report() -> str:
    """Versions, devices and the launch-relevant environment, as lines to paste into a bug report."""
    import os

    rows = [("platform", platform.platform()), ("python", platform.python_version())]
    for name in PACKAGES:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        if name == "distsft" and (commit := _git_commit()):
            version += f" (git {commit})"
        rows.append((name, version))
    rows.append(("CUDA (torch)", torch.version.cuda or "none"))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rows.append((f"GPU {i}", f"{p.name}, {p.total_memory / 2**30:.1f} GiB, compute {p.major}.{p.minor}"))
        rows.append(("bf16 supported", str(torch.cuda.is_bf16_supported())))
    else:
        rows.append(("GPUs", "none (training runs on CPU)"))
    rows.append(("CPU cores", str(os.cpu_count())))
    for var in ("CUDA_VISIBLE_DEVICES", "WORLD_SIZE", "DS_ACCELERATOR", "HF_HUB_OFFLINE", "WANDB_MODE",
                "TRITON_INTERPRET"):
        if var in os.environ:
            rows.append((var, os.environ[var]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

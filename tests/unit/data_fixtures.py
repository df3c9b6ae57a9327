"""Helpers shared by tests/unit/test_data_*.py: tokenizers built offline, data files, configs.

The byte tokenizer maps every UTF-8 byte to one token (id = N_SPECIAL + byte) and has a few special
tokens, so golden token ids can be written down from strings without trusting the code under test.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from distsft.config import DataConfig, DataSourceConfig

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"
DEMO_TOKENIZER_DIR = REPO / "distsft" / "assets" / "tiny-llama"

SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
BOS, EOS, PAD, IM_START, IM_END = range(5)
N_SPECIAL = len(SPECIALS)


def B(text: str) -> list[int]:
    """Golden ids of plain text under the byte tokenizer."""
    return [N_SPECIAL + b for b in text.encode("utf-8")]


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def byte_tokenizer(*, bos: str | None = "<s>", eos: str | None = "</s>", pad: str | None = "<pad>",
                   chat_template: str | None = None, add_bos: bool = False):
    """A byte-level tokenizer (no merges). `add_bos`: its default encoding prepends BOS, like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    b2u = _bytes_to_unicode()
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for b in range(256):
        vocab[b2u[b]] = N_SPECIAL + b
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, BOS)])
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)
    if chat_template is not None:
        t.chat_template = chat_template
    return t


@functools.lru_cache(maxsize=1)
def _demo():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(DEMO_TOKENIZER_DIR))


def demo_tokenizer():
    return _demo()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_json(path: Path, rows: list) -> Path:
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def cfg(*paths, cache_dir: str = "none", **kw) -> DataConfig:
    """A DataConfig over `paths` (str, Path or DataSourceConfig); no cache unless asked."""
    sources = [p if isinstance(p, DataSourceConfig) else DataSourceConfig(path=str(p)) for p in paths]
    kw.setdefault("progress_bar", False)
    return DataConfig(sources=sources, cache_dir=cache_dir, **kw)


def expected_targets(ids: list[int], trained: list[bool]) -> list[int]:
    """target[t] = ids[t+1] where token t+1 is trained, else -100; the last position has none."""
    return [ids[t + 1] if trained[t + 1] else -100 for t in range(len(ids) - 1)] + [-100]


def trained_ids(sample) -> list[int]:
    """Ids of the trained tokens of a one-document sample, in order."""
    return [t for t in sample["target_ids"].tolist() if t != -100]


def trained_runs(sample, tokenizer) -> list[str]:
    """The decoded runs of consecutive trained tokens of a one-document sample (token t is trained when
    target_ids[t-1] is not -100)."""
    ids = sample["input_ids"].tolist()
    trained = [False] + [t != -100 for t in sample["target_ids"].tolist()[:-1]]
    runs: list[list[int]] = []
    for i, (tok, tr) in enumerate(zip(ids, trained, strict=True)):
        if tr:
            if i == 0 or not trained[i - 1]:
                runs.append([])
            runs[-1].append(tok)
    return [tokenizer.decode(r) for r in runs]


def build_one(tmp_path, rows, tokenizer, *, name="d.jsonl", **kw):
    """build_datasets over `rows` written as JSON lines, packing off, every row kept or reported."""
    from distsft.data import build_datasets

    path = write_jsonl(tmp_path / name, rows)
    kw.setdefault("max_drop_ratio", 1.0)
    return build_datasets(cfg(path, packing=False, **kw), tokenizer, seed=0)

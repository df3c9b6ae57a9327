"""Inspect (and pre-build the cache of) a dataset as training would see it.

    python -m distsft.data --data gsm8k_train_alpaca.json --max-seq-len 2048
    python -m distsft.data --config launch/configs/demo.yaml [section.key=value ...]   # the run's data
    python -m distsft.data --data chats.jsonl --tokenizer builtin:tiny-qwen3 --show 3  # offline, Qwen3's template

Prints each source's files (read, or skipped and why), formats, rows read, every rejected, dropped and
truncated row (the first `--list` of each, with row index, line and reason), tokens and packing
efficiency; `--show N` prints the first N training sequences with the trained text in [[...]] and the
control tokens the template wrote (a control-token string inside the data is text, and is not counted).
Exit status 1 (with the reason) when the data is unusable. Running it once before `accelerate launch`
leaves the tokenized cache in place, so the training ranks only read it. `builtin:tiny-<family>` (qwen2.5,
qwen3, llama-3.1, gemma-3, mistral-v0.3) is the embedded tiny vocabulary with that family's special tokens
and real chat template.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from distsft.config import ConfigError, DataConfig, DataSourceConfig, load_config
from distsft.data import DataError, build_datasets
from distsft.loss import IGNORE_INDEX

ASSETS = Path(__file__).resolve().parent.parent / "assets"

# `python -m distsft.data` from the repository root puts the root on sys.path, where transformers' probe
# for the PyPI `kernels` package would find this repo's top-level `kernels/` folder (installed as
# `distsft_kernels`). distsft is already imported by now, so the root can leave the path.
_ROOT = Path(__file__).resolve().parents[2]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]


def _load_tokenizer(name: str):
    from transformers import AutoTokenizer

    from distsft.data.tiny import FAMILIES, tiny_tokenizer

    if name.startswith("builtin:tiny-") and name.removeprefix("builtin:tiny-") in FAMILIES:
        return tiny_tokenizer(name.removeprefix("builtin:tiny-"))
    path = str(ASSETS / name.removeprefix("builtin:")) if name.startswith("builtin:") else name
    return AutoTokenizer.from_pretrained(path)


def _listing(r, limit: int) -> list[str]:
    """Files, and the first `limit` rejected, dropped and truncated rows of each source."""
    lines = []
    for src in r.sources:
        skipped = [f for f in src.files if f.status == "skipped"]
        if len(src.files) > 1 or skipped:
            lines.append(f"{src.name}: {sum(f.status == 'read' for f in src.files)} files read, "
                         f"{len(skipped)} skipped")
            lines += [f"  {f.status} {f.path}" + (f" ({f.rows} rows)" if f.status == "read" else f": {f.reason}")
                      for f in src.files[:limit]]
        for what, items in (("rejected", src.rejections), ("dropped", src.drops), ("truncated", src.truncations)):
            if items:
                lines.append(f"{src.name}: {len(items)} {what}" + (f" (first {limit})" if len(items) > limit else ""))
                lines += [f"  {x.where()}: {x.reason}: {x.detail}" for x in items[:limit]]
    return lines


def _show(ds, tokenizer, n: int) -> None:
    for i in range(min(n, len(ds))):
        s = ds[i]
        ids, tgt, pos = s["input_ids"].tolist(), s["target_ids"].tolist(), s["position_ids"].tolist()
        # target_ids[t] is the token at t+1, so token t is trained when target_ids[t-1] is not IGNORE_INDEX
        trained = [False] + [t != IGNORE_INDEX for t in tgt[:-1]]
        runs: list[tuple[tuple[int, bool], list[int]]] = []
        doc = -1
        for t, tr, p in zip(ids, trained, pos, strict=True):
            doc += p == 0
            key = (doc, tr)
            if runs and runs[-1][0] == key:
                runs[-1][1].append(t)
            else:
                runs.append((key, [t]))
        out, last_doc = [], 0
        for (d, tr), toks in runs:
            if d != last_doc:
                out.append("\n----- next document -----\n")
                last_doc = d
            text = tokenizer.decode(toks)
            out.append(f"[[{text}]]" if tr else text)
        print(f"===== sample {i}: {len(ids)} tokens, {sum(trained)} trained, {doc + 1} documents =====")
        print("".join(out))
        special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
        counts: dict[str, int] = {}
        for t in ids:
            if t in special:
                name = tokenizer.convert_ids_to_tokens(t)
                counts[name] = counts.get(name, 0) + 1
        print("----- control tokens: " + (", ".join(f"{k} x{v}" for k, v in counts.items()) or "none")
              + " (text in the data that looks like one is text, and not counted)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distsft.data", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="a run YAML: use its data section and tokenizer")
    p.add_argument("--data", action="append", help="a data path (repeatable); replaces the config's sources")
    p.add_argument("--format", default="auto", help="auto, alpaca, messages, prompt_completion, text")
    p.add_argument("--field-map", action="append", default=[], metavar="SRC=DST", help="rename a column")
    p.add_argument("--tokenizer", help="tokenizer directory or hub id (default: the run's, else builtin:tiny-llama)")
    p.add_argument("--max-seq-len", type=int)
    p.add_argument("--chat-template")
    p.add_argument("--length-policy", choices=["drop", "truncate_prompt", "raise"])
    p.add_argument("--no-packing", action="store_true")
    p.add_argument("--train-on-inputs", action="store_true")
    p.add_argument("--eval-fraction", type=float)
    p.add_argument("--cache-dir", help="tokenization cache (default ~/.cache/distsft/data; 'none' disables)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--show", type=int, default=0, metavar="N", help="print the first N training sequences")
    p.add_argument("--list", type=int, default=20, metavar="N",
                   help="list the first N files, rejected, dropped and truncated rows of each source (default 20)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides for --config")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    try:
        cfg = load_config(args.config, args.overrides) if (args.config or args.overrides) else None
        data = cfg.data if cfg else DataConfig()
        tok_name = args.tokenizer or (
            cfg and (cfg.model.tokenizer or cfg.model.name_or_path or cfg.model.init_from_config)
        ) or "builtin:tiny-llama"
        seed = args.seed if args.seed is not None else (cfg.train.seed if cfg else 42)
        kw = {}
        if args.data:
            field_map = dict(f.split("=", 1) for f in args.field_map)
            kw["sources"] = [DataSourceConfig(path=d, format=args.format, field_map=field_map) for d in args.data]
        for key in ("max_seq_len", "chat_template", "length_policy", "eval_fraction", "cache_dir"):
            if getattr(args, key) is not None:
                kw[key] = getattr(args, key)
        if args.no_packing:
            kw["packing"] = False
        if args.train_on_inputs:
            kw["train_on_inputs"] = True
        data = DataConfig(**{**{f: getattr(data, f) for f in data.__dataclass_fields__}, **kw})
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    try:
        tokenizer = _load_tokenizer(tok_name)
    except (OSError, ValueError) as e:
        print(f"error: cannot load the tokenizer {tok_name!r}: {str(e).splitlines()[0] if str(e) else e}",
              file=sys.stderr)
        return 2
    try:
        bundle = build_datasets(data, tokenizer, seed=seed)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    r = bundle.report
    if args.json:
        print(json.dumps(r.as_dict(), indent=1))
        return 0
    print(r.summary())
    for line in _listing(r, args.list):
        print(line)
    rejected, dropped = r.rejected, r.dropped
    print(f"rows read: {r.rows_read}")
    for what, counts in (("rejected", rejected), ("dropped", dropped)):
        print(f"{what}: {sum(counts.values())}"
              + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(counts.items()))})" if counts else ""))
    print(f"truncated: {sum(s.truncated for s in r.sources)}")
    print(f"train documents (samples): {r.train.documents}, tokens: {r.train.tokens} "
          f"({r.train.target_tokens} in the loss)")
    print(f"train sequences: {r.train.sequences}" + (f" packed sequences of {r.max_seq_len}" if r.packing else ""))
    print(f"packing efficiency: {100 * r.packing_efficiency:.2f}%")
    _show(bundle.train, tokenizer, args.show)
    return 0


if __name__ == "__main__":
    sys.exit(main())

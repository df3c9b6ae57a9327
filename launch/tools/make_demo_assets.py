"""Rebuild the embedded demo assets under distsft/assets/ (run once; the outputs are committed).

    python launch/tools/make_demo_assets.py --gsm8k gsm8k_train_alpaca.json

Writes:
  distsft/assets/gsm8k-demo/train.jsonl   the first 400 GSM8K train rows (MIT, see ATTRIBUTION.md there)
  distsft/assets/tiny-llama/              a 4-layer Llama config and a 2,048-token byte-level BPE
                                          tokenizer trained on those rows, with a chatml chat template
"""

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[2] / "distsft" / "assets"
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
CHATML = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gsm8k", required=True)
    ap.add_argument("--rows", type=int, default=400)
    args = ap.parse_args()

    rows = json.loads(Path(args.gsm8k).read_text())[: args.rows]
    data_dir = ROOT / "gsm8k-demo"
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "train.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({k: r[k] for k in ("instruction", "input", "output")}, ensure_ascii=False) + "\n")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [r["instruction"] + "\n" + r["input"] + "\n" + r["output"] for r in rows]
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|end_of_text|>"],
    )
    fast.chat_template = CHATML
    model_dir = ROOT / "tiny-llama"
    fast.save_pretrained(model_dir)

    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    config.save_pretrained(model_dir)
    print(f"wrote {len(rows)} rows, vocab {len(fast)} -> {ROOT}")


if __name__ == "__main__":
    main()

"""Offline stand-ins for real model families' tokenizers: the embedded tiny vocabulary
(`distsft/assets/tiny-llama/tokenizer.json`, byte-level BPE) plus the family's special and added tokens, its
BOS/EOS/pad and whether its encoding adds BOS, with the family's real chat template. Token ids differ from
the real tokenizer's; everything the data pipeline depends on (which strings are control tokens, what the
template renders, BOS handling) is the family's.

    tok = tiny_tokenizer("qwen3")        # also `python -m distsft.data --tokenizer builtin:tiny-qwen3`
"""

from __future__ import annotations

from dataclasses import dataclass

from distsft.data.templates import ASSETS, template_source


@dataclass(frozen=True)
class Family:
    bos: str | None
    eos: str
    pad: str
    special: tuple[str, ...]
    added: tuple[str, ...] = ()
    """Added tokens that are not special (Qwen's `<think>`, `<tool_call>`): matched in text, not skipped
    by `skip_special_tokens`."""
    adds_bos: bool = False
    """The tokenizer's own encoding prepends BOS (Llama, Gemma, Mistral)."""


FAMILIES: dict[str, Family] = {
    "qwen2.5": Family(None, "<|im_end|>", "<|endoftext|>", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                      ("<tool_call>", "</tool_call>")),
    "qwen3": Family(None, "<|im_end|>", "<|endoftext|>", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                    ("<tool_call>", "</tool_call>", "<think>", "</think>", "<tool_response>", "</tool_response>")),
    "llama-3.1": Family("<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>",
                        ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                         "<|eot_id|>", "<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>"),
                        adds_bos=True),
    "gemma-3": Family("<bos>", "<eos>", "<pad>", ("<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"),
                      adds_bos=True),
    "mistral-v0.3": Family("<s>", "</s>", "</s>", ("<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]",
                                                  "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
                                                  "[/TOOL_RESULTS]"), adds_bos=True),
}


def tiny_tokenizer(family: str):
    """A `PreTrainedTokenizerFast` on the embedded vocabulary with `family`'s tokens and chat template."""
    from tokenizers import AddedToken, Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    if family not in FAMILIES:
        raise ValueError(f"no tiny tokenizer for {family!r} (known: {', '.join(FAMILIES)})")
    f = FAMILIES[family]
    tok = Tokenizer.from_file(str(ASSETS / "tiny-llama" / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in f.special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in f.added])
    if f.adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{f.bos} $A", pair=f"{f.bos} $A {f.bos} $B", special_tokens=[(f.bos, tok.token_to_id(f.bos))])
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=f.bos, eos_token=f.eos, pad_token=f.pad)
    t.chat_template = template_source(family)
    return t

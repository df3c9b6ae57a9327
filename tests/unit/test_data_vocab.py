"""A tokenizer that does not match the model: a token id at or past the embedding's rows is an error
naming the token and its row, raised before the first forward (not an IndexError or a device assert)."""

import pytest
from data_fixtures import cfg, write_jsonl

from distsft.data import build_datasets, check_token_ids
from distsft.data.report import DataError
from distsft.data.tiny import tiny_tokenizer


def test_token_id_past_the_embedding_names_token_and_row(tmp_path):
    """Regression (issue 19): a tokenizer with more tokens than the model's embedding failed in the first
    forward (IndexError on CPU, a device-side assert on a GPU) with no word of which token or row."""
    tok = tiny_tokenizer("llama-3.1")  # the embedded vocabulary (2,048 tokens) plus Llama's, past it
    rows = [{"text": "plain text"}, {"messages": [{"role": "user", "content": "q"},
                                                  {"role": "assistant", "content": "a"}]}]
    bundle = build_datasets(cfg(write_jsonl(tmp_path / "d.jsonl", rows), packing=False), tok, seed=0)
    check_token_ids(bundle, len(tok), tok)  # the matching model: fine
    eos = tok.eos_token_id
    assert eos >= 2048
    with pytest.raises(DataError, match=rf"d\.jsonl row 0: token id {eos} \('<\|eot_id\|>'\) >= 2048: the "
                                        r"tokenizer \(\d+ tokens\) does not match the model's embedding"):
        check_token_ids(bundle, 2048, tok)


def test_pad_id_past_the_embedding(tmp_path):
    tok = tiny_tokenizer("llama-3.1")  # its pad token is the last one added
    bundle = build_datasets(cfg(write_jsonl(tmp_path / "d.jsonl", [{"text": "t"}])), tok, seed=0)
    rows = max(tok.bos_token_id, tok.eos_token_id) + 1  # every data token fits, the pad id does not
    assert tok.pad_token_id >= rows
    with pytest.raises(DataError, match=rf"the pad token '<\|finetune_right_pad_id\|>' has id {tok.pad_token_id} "
                                        rf">= {rows}"):
        check_token_ids(bundle, rows, tok)

"""Helpers shared by the test tiers (imported as `_support`: every tier's directory is on sys.path, and
a name of our own cannot collide the way several `conftest` modules do)."""

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DEMO_TOKENIZER = "builtin:tiny-llama"


def write_tiny_llama(directory: Path, **overrides) -> Path:
    """A 2-layer Llama config (GQA, vocab of the demo tokenizer) as `directory/config.json`."""
    base = json.loads((REPO / "distsft" / "assets" / "tiny-llama" / "config.json").read_text())
    base.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16)
    base.update(overrides)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(base))
    return directory

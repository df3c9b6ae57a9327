"""Config parsing, overrides, and every error path naming its dotted key."""

import subprocess
import sys

import pytest
import yaml
from _support import REPO

from distsft.config import Config, ConfigError, load_config, parse_override


def test_defaults_are_the_embedded_demo():
    cfg = load_config()
    assert cfg.model.init_from_config == "builtin:tiny-llama" and cfg.model.name_or_path is None
    assert cfg.data.sources[0].path == "builtin:gsm8k-demo"


def test_yaml_then_overrides_win(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"train": {"learning_rate": 1e-3, "max_steps": 7}, "lora": {"r": 4}}))
    cfg = load_config(run, ["train.learning_rate=5e-5", "lora.target_modules=[q_proj, v_proj]",
                            "logging.report_to=tensorboard", "data.sources=[{path: a.jsonl, weight: 2}]"])
    assert cfg.train.learning_rate == 5e-5 and cfg.train.max_steps == 7 and cfg.lora.r == 4
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.logging.report_to == ["tensorboard"]
    assert cfg.data.sources[0].path == "a.jsonl" and cfg.data.sources[0].weight == 2.0


def test_hf_field_names():
    names = {f for section in ("train", "checkpoint", "logging") for f in getattr(Config(), section).__dict__}
    for hf in ("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "max_steps",
               "num_train_epochs", "warmup_ratio", "lr_scheduler_type", "logging_steps", "save_steps",
               "save_total_limit", "seed", "optim", "report_to", "output_dir"):
        assert hf in names, hf


def test_pretrained_model_replaces_demo_default():
    cfg = load_config(overrides=["model.name_or_path=meta-llama/Llama-3.2-1B"])
    assert cfg.model.init_from_config is None


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(overrides=["train.max_steps=3", "data.sources=[{path: x.json, field_map: {q: instruction}}]"])
    cfg.save(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("train.lr=1", "train.lr", "did you mean train.learning_rate"),
        ("lora.lora_alpha=8", "lora.lora_alpha", "did you mean lora.alpha"),
        ("no.such=1", "no", "unknown key"),
        ("train.learning_rate=abc", "train.learning_rate", "expected a number"),
        ("train.max_steps=1.5", "train.max_steps", "expected an integer"),
        ("train.max_steps=0", "train.max_steps", "must be -1"),
        ("train.learning_rate=-1", "train.learning_rate", "must be > 0"),
        ("model.dtype=int8", "model.dtype", "expected one of"),
        ("data.packing=maybe", "data.packing", "expected true or false"),
        ("lora.r=0", "lora.r", "must be > 0"),
        ("lora.dropout=1.5", "lora.dropout", "[0, 1)"),
        ("data.sources=[{paht: x}]", "data.sources.0.paht", "did you mean data.sources.0.path"),
        ("data.sources=[]", "data.sources", "at least one"),
        ("logging.report_to=[mlflow]", "logging.report_to", "unknown tracker"),
        ("train.per_device_train_batch_size=0", "train.per_device_train_batch_size", ">= 1"),
        ("train.learning_rate.x=1", "train.learning_rate", "expected a number"),
        ("model.name_or_path=x", None, None),  # valid
    ],
)
def test_errors_name_the_dotted_key(override, key, words):
    if key is None:
        load_config(overrides=[override])
        return
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert e.value.key == key
    assert str(e.value).startswith(key + ":") and words in str(e.value)


def test_malformed_override_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("train.learning_rate")
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(bad)


@pytest.mark.parametrize("override, key", [("train.lr=abc", "train.lr"), ("no.such=1", "no"),
                                           ("train.learning_rate=abc", "train.learning_rate")])
def test_cli_bad_input_exits_nonzero_with_one_line(override, key):
    proc = subprocess.run([sys.executable, "distsft/train.py", override], capture_output=True, text=True,
                          timeout=120, cwd=str(REPO))
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"distsft: error: {key}:"), proc.stderr


def test_a_pretrained_model_gets_real_run_defaults():
    """Regression: setting model.name_or_path kept the demo's learning rate 1e-3, 5 epochs, 512 tokens, no
    checkpoints and outputs/demo. Keys the run sets win; the demo keeps its own defaults."""
    from distsft.config import build_config

    real = load_config(overrides=["model.name_or_path=org/model"])
    assert (real.train.learning_rate, real.train.num_train_epochs, real.train.warmup_ratio) == (2e-4, 3.0, 0.03)
    assert real.data.max_seq_len == 2048 and real.checkpoint.save_steps == 500
    assert real.train.output_dir is None  # resolved at start: outputs/model (distsft/preflight.py)
    mine = load_config(overrides=["model.name_or_path=org/model", "train.learning_rate=1e-5", "data.max_seq_len=512"])
    assert mine.train.learning_rate == 1e-5 and mine.data.max_seq_len == 512 and mine.train.num_train_epochs == 3.0
    demo = load_config()
    assert (demo.train.learning_rate, demo.train.num_train_epochs, demo.data.max_seq_len) == (1e-3, 5.0, 512)
    assert demo.checkpoint.save_steps == 0
    from_python = build_config({"model": {"name_or_path": "org/model"}, "train": {"max_steps": 10}})
    assert from_python.train.learning_rate == 2e-4 and from_python.train.max_steps == 10


def test_a_dataset_inside_a_dict_config():
    """Regression: distsft.train({...}) refused a `datasets.Dataset` in data.sources ("expected a string")."""
    datasets = pytest.importorskip("datasets")
    from distsft.config import build_config

    ds = datasets.Dataset.from_list([{"instruction": "a", "output": "b"}])
    for sources in ([{"path": ds, "weight": 2}], [ds]):
        cfg = build_config({"data": {"sources": sources}})
        assert cfg.data.sources[0].path.startswith("memory:")
    with pytest.raises(ConfigError, match=r"^data\.sources\.0\.path: expected a string"):
        build_config({"data": {"sources": [{"path": 3.5j}]}})


def test_an_override_value_is_never_silently_cut():
    """Regression (issue 22, fault 7): `train.output_dir='runs/exp #2'` was silently cut to `runs/exp`:
    dotted overrides are parsed as YAML, where ` #` starts a comment, and `resume_from_checkpoint=auto`
    then resumed another run and overwrote its adapter. A string setting now takes the text as typed
    wherever YAML would read something else; any other setting refuses a comment, naming the key."""
    from distsft.entry import parse_args

    assert load_config(overrides=["train.output_dir=runs/exp #2"]).train.output_dir == "runs/exp #2"
    cfg = load_config(overrides=["logging.run_name=#1", "logging.wandb_notes=0123", "model.revision=2024_01",
                                 "logging.wandb_group=yes", "model.name_or_path=org/m#x"])
    assert cfg.logging.run_name == "#1"
    assert cfg.logging.wandb_notes == "0123" and cfg.model.revision == "2024_01" and cfg.logging.wandb_group == "yes"
    assert cfg.model.name_or_path == "org/m#x"  # a `#` inside a word was never a comment
    assert parse_args(["train.output_dir=runs/exp #2"]).train.output_dir == "runs/exp #2"  # the command line
    # YAML's typing stays where it is wanted.
    typed = load_config(overrides=["train.learning_rate=1e-4", "train.max_steps=1_000", "data.packing=no",
                                   "lora.target_modules=[q_proj, v_proj]", "model.revision=null",
                                   "train.output_dir='quoted #1'"])
    assert typed.train.learning_rate == 1e-4 and typed.train.max_steps == 1000 and typed.data.packing is False
    assert typed.lora.target_modules == ["q_proj", "v_proj"] and typed.model.revision is None
    assert typed.train.output_dir == "quoted #1"
    for override, key in (("train.learning_rate=1e-4 # peak", "train.learning_rate"),
                          ("lora.target_modules=[q_proj] # attention", "lora.target_modules"),
                          ("data.packing=true #x", "data.packing")):
        with pytest.raises(ConfigError, match=r"' #' starts a YAML comment") as e:
            load_config(overrides=[override])
        assert e.value.key == key
    # What a run writes reads back as the same config (the launcher passes the resolved output_dir on).
    import json

    assert load_config(overrides=[f"train.output_dir={json.dumps('runs/exp #2')}"]).train.output_dir == "runs/exp #2"


def test_resolved_config_with_odd_strings_round_trips(tmp_path):
    cfg = load_config(overrides=["train.output_dir=runs/exp #2", "logging.run_name=0123", "model.revision=2024_01"])
    cfg.save(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg

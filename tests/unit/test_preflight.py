"""Pre-flight checks (distsft/preflight.py): one line naming the key, before the accelerator or the model
exists, and an output directory holding an earlier run is never clobbered."""

import json

import pytest
from _support import REPO, write_tiny_llama

from distsft.config import load_config
from distsft.preflight import (
    check_data_paths,
    check_model,
    check_resume,
    check_tokenizer,
    preflight,
    prepare_output_dir,
    prior_run,
    resolve_output_dir,
)


def cfg_for(tmp_path, out=None, *overrides):
    model = write_tiny_llama(tmp_path / "model")
    args = [f"model.init_from_config={model}", "model.tokenizer=builtin:tiny-llama"]
    if out is not None:
        args.append(f"train.output_dir={out}")
    return load_config(overrides=[*args, *overrides])


def finished_run(out, steps=160, checkpoint=False):
    """What a finished run leaves: adapter, summary, metrics (and a committed checkpoint)."""
    (out / "adapter").mkdir(parents=True)
    (out / "summary.json").write_text(json.dumps({"final_step": steps}))
    (out / "metrics.jsonl").write_text(json.dumps({"step": steps, "train/loss": 1.0}) + "\n")
    (out / "config.yaml").write_text("old: config\n")
    if checkpoint:
        ckpt = out / "checkpoints" / f"step-{steps:08d}"
        ckpt.mkdir(parents=True)
        (ckpt / "manifest.json").write_text("{}")
    return out


def test_a_finished_run_is_refused_with_the_flags_that_replace_or_continue_it(tmp_path):
    """Regression: a new run into the directory of a finished one replaced its adapter and summary and
    appended to its metrics (the DDP command after the demo). Refused, naming the directory and the flags."""
    out = finished_run(tmp_path / "run", checkpoint=True)
    cfg = cfg_for(tmp_path, out)
    with pytest.raises(ValueError) as e:
        resolve_output_dir(cfg)
    msg = str(e.value)
    assert msg.startswith(f"train.output_dir: {out} already holds a finished run (step 160;")
    assert "train.overwrite_output_dir=true" in msg and "checkpoint.resume_from_checkpoint=auto" in msg
    assert "\n" not in msg
    # without a checkpoint there is nothing to continue: only replacing it is offered
    plain = finished_run(tmp_path / "plain")
    with pytest.raises(ValueError, match="overwrite_output_dir") as e:
        resolve_output_dir(cfg_for(tmp_path, plain))
    assert "resume_from_checkpoint" not in str(e.value)


def test_resume_auto_continues_and_overwrite_replaces(tmp_path):
    out = finished_run(tmp_path / "run", checkpoint=True)
    assert resolve_output_dir(cfg_for(tmp_path, out, "checkpoint.resume_from_checkpoint=auto")) == out
    cfg = cfg_for(tmp_path, out, "train.overwrite_output_dir=true")
    assert resolve_output_dir(cfg) == out
    assert (out / "adapter").is_dir()  # deciding writes nothing
    prepare_output_dir(cfg)  # the main process, once the run starts: the old run's files go
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]
    assert load_config(out / "config.yaml").train.overwrite_output_dir is True
    with pytest.raises(ValueError, match="set one of them"):
        resolve_output_dir(cfg_for(tmp_path, out, "train.overwrite_output_dir=true",
                                   "checkpoint.resume_from_checkpoint=auto"))


def test_a_failed_start_is_not_a_run(tmp_path):
    """A start that failed before its first step leaves config.yaml (and data_report.json): the next run
    may use the directory; so may an unfinished run with no checkpoint under resume=auto (a restart)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("x: 1\n")
    (out / "data_report.json").write_text("{}")
    assert prior_run(out) is None and resolve_output_dir(cfg_for(tmp_path, out)) == out
    (out / "metrics.jsonl").write_text(json.dumps({"step": 3, "train/loss": 2.0}) + "\n{\"step\": 4, \"tr")
    prior = prior_run(out)
    assert prior is not None and not prior.finished and prior.last_step == 3  # a partial last line is skipped
    with pytest.raises(ValueError, match="an unfinished run"):
        resolve_output_dir(cfg_for(tmp_path, out))
    assert resolve_output_dir(cfg_for(tmp_path, out, "checkpoint.resume_from_checkpoint=auto")) == out


def test_default_output_dir_takes_the_next_free_name(tmp_path, monkeypatch):
    """The no-argument demo, run twice: the second run writes outputs/demo-2 (the first is kept)."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config()
    assert cfg.train.output_dir is None
    assert resolve_output_dir(cfg).as_posix() == "outputs/demo"
    finished_run(tmp_path / "outputs" / "demo")
    finished_run(tmp_path / "outputs" / "demo-2")
    cfg = load_config()
    assert resolve_output_dir(cfg).as_posix() == "outputs/demo-3" and cfg.train.output_dir == "outputs/demo-3"
    named = load_config(overrides=["model.name_or_path=meta-llama/Llama-3.1-8B-Instruct"])
    assert resolve_output_dir(named).as_posix() == "outputs/Llama-3.1-8B-Instruct"


def test_bad_resume_path_is_refused_before_anything_is_written(tmp_path):
    """Regression: a run with a bad resume path failed after overwriting the good run's config.yaml."""
    out = finished_run(tmp_path / "run", checkpoint=True)
    cfg = cfg_for(tmp_path, out, f"checkpoint.resume_from_checkpoint={tmp_path / 'nope'}")
    with pytest.raises(ValueError, match=r"^checkpoint\.resume_from_checkpoint: no such directory"):
        preflight(cfg)
    broken = tmp_path / "broken"
    broken.mkdir()
    with pytest.raises(ValueError, match=r"^checkpoint\.resume_from_checkpoint: .*no manifest\.json"):
        check_resume(cfg_for(tmp_path, out, f"checkpoint.resume_from_checkpoint={broken}"))
    assert (out / "config.yaml").read_text() == "old: config\n"


@pytest.mark.parametrize("override, key, words", [
    ("data.sources=[{path: missing.jsonl}]", "data.sources.0.path", "no such file or folder: missing.jsonl"),
    ("data.sources=[{path: builtin:gsm8k-demo}, {path: ./data/}]", "data.sources.1.path", "no such file"),
    ("data.sources=[{path: builtin:nope}]", "data.sources.0.path", "no builtin dataset"),
    ("data.eval_path=/no/eval.json", "data.eval_path", "no such file"),
    ("data.chat_template=mine.jinja", "data.chat_template", "no such file"),
])
def test_missing_data_is_named_by_key(tmp_path, override, key, words):
    """Regression: a data-path typo surfaced only after the model was built, as a traceback."""
    with pytest.raises(ValueError) as e:
        check_data_paths(load_config(overrides=[override]).data)
    assert str(e.value).startswith(f"{key}: ") and words in str(e.value)
    check_data_paths(load_config(overrides=["data.sources=[{path: some-org/some-hub-dataset}]"]).data)  # hub: later


def test_model_directory_without_tokenizer_is_named(tmp_path):
    """Regression: launch/shapes/* (a config.json only) died in a raw transformers error."""
    cfg = load_config(overrides=[f"model.init_from_config={REPO / 'launch' / 'shapes' / 'llama3-1b'}"])
    with pytest.raises(ValueError) as e:
        check_tokenizer(cfg.model)
    msg = str(e.value)
    assert msg.startswith("model.init_from_config: ") and "holds no tokenizer" in msg and "model.tokenizer" in msg
    cfg = load_config(overrides=[f"model.name_or_path={tmp_path}"])
    with pytest.raises(ValueError, match=r"^model\.name_or_path: .* has no config\.json"):
        check_model(cfg.model)
    cfg = load_config(overrides=[f"model.name_or_path={tmp_path / 'missing'}"])
    with pytest.raises(ValueError, match=r"^model\.name_or_path: no such file or directory"):
        check_model(cfg.model)
    cfg = load_config(overrides=["model.init_from_config=builtin:nope"])
    with pytest.raises(ValueError, match=r"^model\.init_from_config: unknown builtin asset"):
        check_model(cfg.model)
    check_tokenizer(load_config().model)  # the demo's loads


def test_missing_wandb_login_is_one_line(tmp_path, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DISABLED", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = cfg_for(tmp_path, tmp_path / "out", "logging.report_to=wandb")
    with pytest.raises(ValueError, match=r"^logging\.report_to: .*no W&B API key"):
        preflight(cfg)
    assert not (tmp_path / "out").exists()


def test_deepspeed_config_must_exist(tmp_path):
    cfg = cfg_for(tmp_path, tmp_path / "out", f"distributed.deepspeed_config={tmp_path / 'zero9.json'}")
    with pytest.raises(ValueError, match=r"^distributed\.deepspeed_config: no such file"):
        preflight(cfg)


def test_data_files_are_judged_as_the_data_pipeline_reads_them(tmp_path, monkeypatch):
    """Regression: the pre-flight check imported a suffix list the data pipeline no longer has (every run
    died on an ImportError), and judged files by their last suffix alone, so it would have refused the
    `.JSONL` and `.json.gz` files the pipeline reads. It now asks the pipeline's own `file_kind`."""
    monkeypatch.chdir(tmp_path)
    for name in ("upper.JSONL", "rows.json.gz", "table.parquet.gz", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    for ok in ("upper.JSONL", "rows.json.gz"):
        check_data_paths(load_config(overrides=[f"data.sources=[{{path: {ok}}}]"]).data)
    with pytest.raises(ValueError, match=r"^data\.sources\.0\.path: table\.parquet\.gz: compressed \.parquet"):
        check_data_paths(load_config(overrides=["data.sources=[{path: table.parquet.gz}]"]).data)
    with pytest.raises(ValueError, match=r"^data\.sources\.0\.path: notes\.txt: unsupported file type '\.txt'"):
        check_data_paths(load_config(overrides=["data.sources=[{path: notes.txt}]"]).data)

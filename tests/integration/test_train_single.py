"""The single-process loop end to end on a tiny model: falling loss, adapter export, exact resume."""

import json
import shutil

import pytest
import torch

import distsft
from distsft.config import load_config

pytestmark = pytest.mark.integration


def run_config(tmp, model_dir, out, **extra):
    overrides = {
        "model.init_from_config": str(model_dir), "model.tokenizer": "builtin:tiny-llama",
        "model.dtype": "float32", "model.attn_implementation": "eager",
        "lora.r": 8, "lora.dropout": 0.1,  # dropout: the resume must reproduce its masks too
        "data.max_seq_len": 256, "data.cache_dir": str(tmp / "cache"),
        "train.output_dir": str(out), "train.per_device_train_batch_size": 2,
        "train.gradient_accumulation_steps": 2, "train.max_steps": 6, "train.learning_rate": 3e-3,
        "train.warmup_steps": 1, "logging.logging_steps": 1, "logging.progress_bar": False,
        "kernels.backend": "torch",
    }
    overrides.update(extra)
    return load_config(overrides=[f"{k}={v}" for k, v in overrides.items()])


FAKE_TOKEN = "hf_" + "FakeTokenForDistsftTests" * 2


def losses(out):
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    by_step = {}
    for r in recs:
        if "train/loss" in r:
            by_step[r["step"]] = r["train/loss"]  # a resumed run appends; the latest record wins
    return by_step


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from _support import write_tiny_llama

    tmp = tmp_path_factory.mktemp("single")
    model_dir = write_tiny_llama(tmp / "model")
    full = tmp / "full"
    result = distsft.train(run_config(tmp, model_dir, full, **{"checkpoint.save_steps": 3,
                                                               "logging.wandb_notes": f"token {FAKE_TOKEN}"}))
    # Resume: a copy of the full run's output cut back to its step-3 checkpoint, then trained to step 6.
    resumed = tmp / "resumed"
    shutil.copytree(full / "checkpoints" / "step-00000003", resumed / "checkpoints" / "step-00000003")
    resumed_result = distsft.train(
        run_config(tmp, model_dir, resumed, **{"checkpoint.save_steps": 3}), resume_from_checkpoint="auto"
    )
    return {"tmp": tmp, "model_dir": model_dir, "full": full, "result": result, "resumed": resumed,
            "resumed_result": resumed_result}


def test_train_output_and_files(runs):
    result, full = runs["result"], runs["full"]
    assert result.global_step == 6 and result.metrics["steps"] == 6
    assert (full / "config.yaml").is_file() and load_config(full / "config.yaml").train.max_steps == 6
    for f in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/tokenizer.json",
              "metrics.jsonl", "summary.json", "training_curves.png"):
        assert (full / f).is_file(), f
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]


def test_no_file_holds_a_secret_typed_into_the_config(runs):
    """Regression (issue 22, fault 8): a secret typed into a config string (here a hub token in
    logging.wandb_notes) was written into config.yaml, in the output folder and in every checkpoint."""
    written = [p for p in runs["full"].rglob("*") if p.is_file()]
    assert {"config.yaml", "distsft_config.yaml"} <= {p.name for p in written}
    assert sum(p.name == "config.yaml" for p in written) == 3  # the output folder's, and two checkpoints'
    for p in written:
        assert FAKE_TOKEN.encode() not in p.read_bytes(), p
    assert load_config(runs["full"] / "config.yaml").logging.wandb_notes == "token ***"


def test_loss_falls(runs):
    curve = losses(runs["full"])
    assert sorted(curve) == [1, 2, 3, 4, 5, 6]
    assert curve[6] < curve[1] - 0.05, curve


def test_resume_equals_uninterrupted_run_bitwise(runs):
    full, resumed = losses(runs["full"]), losses(runs["resumed"])
    assert [resumed[s] for s in (4, 5, 6)] == [full[s] for s in (4, 5, 6)]  # exact, fp32
    assert runs["resumed_result"].global_step == 6
    from safetensors.torch import load_file

    a = load_file(str(runs["full"] / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(runs["resumed"] / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The tracker run continues: one run id across both pieces.
    events = [json.loads(x) for x in (runs["resumed"] / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "resumed" for e in events)
    loads = [e["checkpoint/load_s"] for e in events if "checkpoint/load_s" in e]  # the resume's load time
    assert len(loads) == 1 and loads[0] > 0


def test_resumed_summary_covers_the_whole_run(runs):
    """Regression: a resumed run's summary covered only its last segment. It says where it resumed and gives
    the whole run's label tokens (equal to the uninterrupted run's) and train time beside the session's."""
    full = json.loads((runs["full"] / "summary.json").read_text())
    resumed = json.loads((runs["resumed"] / "summary.json").read_text())
    assert "resumed_at_step" not in full and full["steps"] == full["final_step"] == 6
    assert resumed["resumed_at_step"] == 3 and resumed["steps"] == 3 and resumed["final_step"] == 6
    assert resumed["run_label_tokens"] == full["label_tokens"]
    assert resumed["run_train_seconds"] > resumed["train_seconds"]
    assert resumed["final_train_loss"] == full["final_train_loss"]  # the last window's mean, bitwise


def test_adapter_reloads_with_peft_and_gives_identical_logits(runs):
    """The exported adapter, loaded with PeftModel.from_pretrained, is the trained model: its logits equal
    those of a model restored from the final (step 6) training checkpoint."""
    from peft import PeftModel

    from distsft.checkpoint import load_checkpoint
    from distsft.config import KernelsConfig, LoraConfig, ModelConfig, TrainConfig
    from distsft.loss import select_loss_fn
    from distsft.model import CausalLMWithLoss, add_lora, load_base_model
    from distsft.optim import build_optimizer

    cfg = ModelConfig(init_from_config=str(runs["model_dir"]), dtype="float32", attn_implementation="eager")
    cpu = torch.device("cpu")
    loss_fn = select_loss_fn(KernelsConfig(backend="torch"))
    trained = CausalLMWithLoss(add_lora(load_base_model(cfg, cpu, seed=42), LoraConfig(r=8)), loss_fn)
    opt = build_optimizer(trained, TrainConfig(), cpu)
    load_checkpoint(runs["full"] / "checkpoints" / "step-00000006", model=trained, optimizer=opt, scheduler=None)
    reloaded = PeftModel.from_pretrained(load_base_model(cfg, cpu, seed=42), str(runs["full"] / "adapter"))
    untrained = add_lora(load_base_model(cfg, cpu, seed=42), LoraConfig(r=8))
    ids = torch.randint(5, 2000, (2, 32), generator=torch.Generator().manual_seed(0))
    a = CausalLMWithLoss(reloaded.eval(), loss_fn).logits(ids)
    assert torch.equal(a, trained.eval().logits(ids))
    assert not torch.allclose(a, CausalLMWithLoss(untrained.eval(), loss_fn).logits(ids))  # training changed it


def test_merged_export_matches_adapter(runs):
    tmp = runs["tmp"]
    out = tmp / "merged-run"
    distsft.train(run_config(tmp, runs["model_dir"], out, **{"train.max_steps": 2, "checkpoint.save_merged": True,
                                                             "lora.dropout": 0.0}))
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from distsft.config import ModelConfig
    from distsft.model import load_base_model

    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    base = load_base_model(ModelConfig(init_from_config=str(runs["model_dir"]), dtype="float32",
                                       attn_implementation="eager"), torch.device("cpu"), seed=42)
    adapted = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    ids = torch.randint(5, 2000, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_eval_every_n_steps_on_a_held_out_fraction(runs):
    tmp = runs["tmp"]
    out = tmp / "eval-run"
    result = distsft.train(run_config(tmp, runs["model_dir"], out, **{
        "train.max_steps": 4, "train.eval_steps": 2, "data.eval_fraction": 0.1, "lora.dropout": 0.0}))
    evals = {r["step"]: r["eval/loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "eval/loss" in r}
    assert sorted(evals) == [2, 4] and all(5.0 < v < 9.0 for v in evals.values())
    assert evals[4] < evals[2]  # it learns, measured on rows it never trained on
    assert result.metrics["final_eval_loss"] == evals[4] and result.metrics["best_eval_loss"] == evals[4]
    report = json.loads((out / "data_report.json").read_text())
    assert report["eval"]["documents"] > 0 and report["train"]["documents"] > report["eval"]["documents"]


@pytest.mark.parametrize("mode", ["all-offloaded", "auto-tight", "auto-roomy"])
def test_recomputation_through_the_trainer(runs, tmp_path, mode, monkeypatch):
    """`model.gradient_checkpointing` true (with offloaded inputs) and auto (a budget nothing fits: every
    layer; a roomy one: none) train the same losses as the full run (dropout 0.1: the recompute replays
    its masks), the checkpointed layers really go through distsft's checkpoint (offloaded or not), and
    the plan is logged as an event."""
    import distsft.recompute as recompute

    calls = {"offloaded": 0, "device": 0}

    def counting(kind, fn):
        def wrapped(*a, **k):
            calls[kind] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(recompute, "offloaded_checkpoint", counting("offloaded", recompute.offloaded_checkpoint))
    monkeypatch.setattr(recompute, "device_checkpoint", counting("device", recompute.device_checkpoint))
    extra = {"all-offloaded": {"model.gradient_checkpointing": "true", "model.offload_checkpoints": "true"},
             "auto-tight": {"model.gradient_checkpointing": "auto", "model.memory_budget_gib": 1e-6},
             "auto-roomy": {"model.gradient_checkpointing": "auto", "model.memory_budget_gib": 1000}}[mode]
    out = tmp_path / "out"
    distsft.train(run_config(runs["tmp"], runs["model_dir"], out, **{"checkpoint.save_steps": 3}, **extra))
    reference = losses(runs["full"])
    got = losses(out)
    assert got.keys() == reference.keys()
    for step, loss in got.items():
        assert loss == pytest.approx(reference[step], rel=1e-6, abs=1e-7), (step, got, reference)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    plan = next(e for e in events if e.get("event") == "recomputation")
    layers = {"all-offloaded": 2, "auto-tight": 2, "auto-roomy": 0}[mode]
    assert plan["checkpointed_layers"] == layers and plan["num_layers"] == 2
    # 6 steps x 2 micro-batches x checkpointed layers, each through the checkpoint the mode names
    used = {"all-offloaded": "offloaded", "auto-tight": "device", "auto-roomy": None}[mode]
    assert calls == {k: (6 * 2 * layers if k == used else 0) for k in calls}, calls

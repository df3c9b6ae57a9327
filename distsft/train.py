"""distsft: LoRA supervised fine-tuning, one loop for every mode.

    accelerate launch distsft/train.py                                  # the embedded demo
    accelerate launch distsft/train.py --config launch/configs/x.yaml train.learning_rate=1e-4
    python -c "import distsft; distsft.train('launch/configs/x.yaml')"  # the Python API

`main(cfg)` reads top to bottom: preflight, accelerator, data, model, optimizer and schedule, prepare,
resume, trackers, the loop, then `finish` (export, summary). Everything else is a function in a sibling
module taking the sub-config it needs; only this file sees the whole config. `python distsft/train.py`
parses its command line and maps the outcome to an exit code through distsft/entry.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # `accelerate launch distsft/train.py` runs this file as a script, and Python put distsft/ itself
    # first on sys.path, where a sibling named like a stdlib module would shadow it. Import the package
    # as a package instead: installed, or else from the checkout (appended last, so that our `kernels/`
    # folder cannot shadow the PyPI `kernels` package).
    import importlib.util

    _pkg_dir = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _pkg_dir]
    if importlib.util.find_spec("distsft") is None:
        sys.path.append(str(_pkg_dir.parent))
    from distsft.lifecycle import PREEMPTION, watch_agent

    PREEMPTION.install()  # from here on a preemption signal ends the process with 75 and a status record
    watch_agent()  # a torchrun worker stops when its agent is gone
    from distsft.entry import parse_args

    _CLI_CONFIG = parse_args()  # a bad key or value exits here, before torch is imported

import torch
from accelerate.utils import broadcast_object_list
from transformers.trainer_utils import TrainOutput

from distsft import attention
from distsft.attention import VARLEN_IMPLEMENTATIONS, check_wrapper_isolation, packed_attention_kwargs
from distsft.census import record_kernels, report_census
from distsft.checkpoint import resume, rotate, save_checkpoint, step_dir_name
from distsft.config import Config, build_config, load_config
from distsft.data import GlobalBatchSampler, build_datasets, check_token_ids, collate
from distsft.distributed import prepare_for_mode, sample_digest, start_accelerator, zero_stage
from distsft.export import adapter_state_dict, export_adapter, export_merged, save_adapter
from distsft.flops import peak_flops, trainable_params
from distsft.lifecycle import PREEMPTION, NonFiniteSteps, PreemptionFlag, injected_fault, injected_signal
from distsft.logs import setup_logging
from distsft.loss import IGNORE_INDEX, backward_scale, count_targets, target_indices
from distsft.model import build_model, load_tokenizer, trainable_numel_on_meta
from distsft.optim import build_optimizer, build_scheduler, schedule_length
from distsft.plots import plot_run
from distsft.preflight import preflight, prepare_output_dir
from distsft.progress import ProgressBar, StepTimer, ThroughputMeter, print_summary
from distsft.recompute import decoder_layers, setup_recomputation
from distsft.tracking import Tracker, new_run_id

logger = logging.getLogger("distsft")


def step_seed(seed: int, step: int, rank: int) -> int:
    """RNG policy: every optimizer step reseeds from (seed, step, rank), so dropout masks after a resume
    are those of the uninterrupted run, and no RNG state needs saving."""
    digest = hashlib.sha256(f"{seed}:{step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def to_device(batch: dict[str, torch.Tensor], device: torch.device, packed: bool, attn_impl: str,
              dtype: torch.dtype) -> dict:
    extra = {"target_index": target_indices(batch["target_ids"])}  # from host labels: no sync in the loss
    if packed and attn_impl in VARLEN_IMPLEMENTATIONS:  # document lengths, from host positions: no sync
        extra.update(packed_attention_kwargs(batch["position_ids"], attn_impl, dtype))
    out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in {**batch, **extra}.items()}
    if packed and attn_impl not in VARLEN_IMPLEMENTATIONS:  # several documents per row: attention stays in each
        out.update(packed_attention_kwargs(out["position_ids"], attn_impl, dtype))
    return out


def evaluate(model, dataset, cfg: Config, accelerator, pad_id: int, dtype: torch.dtype,
             preemption: PreemptionFlag) -> float | None:
    """Token-weighted eval loss over the whole eval set. Every rank runs the same number of forwards
    (ZeRO-3 forwards are collectives); a rank with no samples left feeds a fully-masked batch. Returns
    None when a preemption signal arrives meanwhile (all ranks agree on it before every batch)."""
    rank, world, bs = accelerator.process_index, accelerator.num_processes, cfg.train.per_device_eval_batch_size
    mine = list(range(rank, len(dataset), world))
    n_batches = math.ceil(len(dataset) / (world * bs))
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    model.eval()
    with torch.no_grad():
        for b in range(n_batches):
            if preemption.agreed(accelerator):
                model.train()
                return None
            idx = mine[b * bs : (b + 1) * bs]
            samples = [dataset[i] for i in idx] or [dataset[0]]
            batch = collate(samples, pad_token_id=pad_id)
            if not idx:
                batch["target_ids"].fill_(IGNORE_INDEX)
            batch = to_device(batch, accelerator.device, cfg.data.packing, cfg.model.attn_implementation, dtype)
            s, n = model(**batch)
            loss_sum += s.double()
            count += n.double()
    model.train()
    loss_sum, count = accelerator.reduce(torch.stack([loss_sum, count]), "sum")
    return float(loss_sum / count.clamp(min=1))


def start_tracker(cfg: Config, state: dict, *, is_main: bool, world: int, recompute, resumed: tuple | None,
                  data_report, **model_fields) -> Tracker:
    """The run's tracker: one run id for all ranks, continued from the checkpoint on resume (`state`); then the
    opening records: recomputation (`recompute`: its plan, or None), how the model runs (the `model` event's
    `model_fields`), where it resumed (`resumed`: checkpoint and load seconds), what the data became."""
    step = state["global_step"]
    run_id = state.get("tracker_run_id") or broadcast_object_list([new_run_id() if is_main else None])[0]
    tracker = Tracker(cfg.logging, str(Path(cfg.train.output_dir)), is_main=is_main, config_dict=cfg.to_dict(),
                      run_id=run_id, world_size=world, start_step=step if resumed else None)
    if recompute is not None:
        tracker.event("recomputation", step, offload=cfg.model.offload_checkpoints, **recompute.event_fields())
    tracker.event("model", step, **model_fields)
    if resumed is not None:
        tracker.event("resumed", step, path=str(resumed[0]), from_world_size=state["world_size"])
        tracker.log({"checkpoint/load_s": resumed[1]}, step)
        if state["world_size"] != world:
            tracker.event("world_size_changed", step, before=state["world_size"], after=world)
    tracker.log({f"data/{k}": v for k, v in data_report.as_dict()["train"].items() if isinstance(v, (int, float))},
                step)
    return tracker


def finish(cfg: Config, wrapper, tokenizer, *, accelerator, tracker: Tracker, meter: ThroughputMeter,
           state: dict, step_losses: list[float], eval_losses: list[float]) -> TrainOutput:
    """After the loop, every rank: the adapter in PEFT format with the tokenizer and a model card (optionally
    the merged model), the run summary and the plot; what `train()` returns."""
    out_dir, step, is_main = Path(cfg.train.output_dir), state["global_step"], accelerator.is_main_process
    window = step_losses[-cfg.logging.logging_steps:]  # the loss the summary reports: the last logging window
    last_window_loss = sum(window) / len(window) if window else None
    adapter, adapter_dir = adapter_state_dict(wrapper, is_main), out_dir / "adapter"
    if is_main:
        export_adapter(wrapper.peft_model, adapter, adapter_dir, cfg=cfg, tokenizer=tokenizer,
                       device=accelerator.device, steps=step, train_loss=last_window_loss,
                       eval_loss=eval_losses[-1] if eval_losses else None, world_size=accelerator.num_processes)
        if cfg.checkpoint.save_merged:
            export_merged(wrapper.peft_model, tokenizer, out_dir / "merged")
    accelerator.wait_for_everyone()

    summary = print_summary(
        meter.totals(step, reduce=lambda t: accelerator.reduce(t, "sum")), train_loss=last_window_loss,
        train_loss_steps=len(window), final_eval_loss=eval_losses[-1] if eval_losses else None,
        best_eval_loss=min(eval_losses, default=None), run_label_tokens=state["tokens_consumed"],
        run_train_seconds=state.get("train_seconds", 0.0) + meter.elapsed(), adapter_dir=str(adapter_dir),
        enabled=is_main,
    )
    tracker.summary(summary)
    tracker.close()
    if is_main:
        plot_run(out_dir / "metrics.jsonl", out_dir / "training_curves.png")
    metrics = {
        "train_loss": sum(step_losses) / len(step_losses) if step_losses else float("nan"),
        **{k: v for k, v in summary.items() if isinstance(v, (int, float))},
        "skipped_steps": state["skipped_steps"],
    }
    accelerator.end_training()
    return TrainOutput(global_step=step, training_loss=metrics["train_loss"], metrics=metrics)


def main(cfg: Config) -> TrainOutput:
    preemption = PREEMPTION  # a signal before the loop ends the process at once (distsft/lifecycle.py)
    preemption.install()  # a no-op when the entry point installed it at process start
    cfg = preflight(cfg)  # one line naming the key, before any work; the run's copy (replaced, never changed)
    accelerator, stage, as_ddp = start_accelerator(cfg.distributed, model_dtype=cfg.model.dtype,
                                                   trainable_numel=lambda: trainable_numel_on_meta(cfg.model, cfg.lora))
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    setup_logging(is_main=is_main, rank=rank)
    if as_ddp is not None:
        logger.info("distributed: running the ZeRO-%d config as DDP (distributed.zero12=%s): %s; "
                    "distributed.zero12=deepspeed keeps DeepSpeed", stage, cfg.distributed.zero12, as_ddp)
    # `auto` attention resolved once, for this device: config.yaml, checkpoints, adapter, trackers say what ran.
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, attn_implementation=attention.resolve(cfg.model.attn_implementation, device)))
    out_dir, ckpt_root = Path(cfg.train.output_dir), Path(cfg.train.output_dir) / "checkpoints"
    if is_main:
        prepare_output_dir(cfg)  # nothing is written into the output directory before this point
    config_hash = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
    torch.manual_seed(cfg.train.seed)

    # Data: tokenised once (main process first), packed, and ordered independently of the world size.
    # Before the model: a bad row or a dataset too small for one step must not wait for an 8B model to load.
    tokenizer = load_tokenizer(cfg.model)
    data = build_datasets(cfg.data, tokenizer, seed=cfg.train.seed, output_dir=str(out_dir),
                          main_process_first=accelerator.main_process_first, is_main_process=is_main)
    micro, accum = cfg.train.per_device_train_batch_size, cfg.train.gradient_accumulation_steps
    global_batch = micro * accum * world
    steps_per_epoch, total_steps = schedule_length(cfg.train, len(data.train), world)

    # Model: HF causal LM -> LoRA -> our kernels on this instance -> the module that owns head + loss.
    model, kernel_report = build_model(cfg.model, cfg.lora, cfg.kernels, device, seed=cfg.train.seed)
    injected_signal("sigterm_after_model", 0, rank, "SIGTERM")
    check_token_ids(data, model.causal_lm.get_input_embeddings().num_embeddings, tokenizer)
    compute_dtype = next(model.causal_lm.parameters()).dtype
    optimizer = build_optimizer(model, cfg.train, device)
    scheduler = build_scheduler(optimizer, cfg.train, total_steps)
    model, optimizer, backend, zero3_filled = prepare_for_mode(  # backend: backward and step, the same in every mode
        accelerator, model, optimizer, layers=decoder_layers(model), dtype=compute_dtype, micro_batch=micro,
        accum=accum, max_grad_norm=cfg.train.max_grad_norm, zero3_gather=cfg.distributed.zero3_gather,
        zero3_fast_paths=cfg.distributed.zero3_fast_paths)
    unwrapped = accelerator.unwrap_model(model)
    recompute_plan = setup_recomputation(unwrapped, cfg.model, micro_batch=micro, seq_len=cfg.data.max_seq_len,
                                         packing=cfg.data.packing, fused_loss=cfg.kernels.fused_linear_cross_entropy)
    if cfg.data.packing:  # refuse an attention backend that lets packed documents see each other (a few ms)
        check_wrapper_isolation(unwrapped, cfg.model.attn_implementation, device, compute_dtype)

    # Resume: the trainable state, optimizer, schedule and the data position (a global sample count).
    state, resume_path, load_s = resume(
        out_dir, cfg.checkpoint.resume_from_checkpoint, model=unwrapped, optimizer=optimizer, scheduler=scheduler,
        global_batch=global_batch, allow_global_batch_change=cfg.distributed.allow_global_batch_change, is_main=is_main)
    first_step = step = state["global_step"]
    batches = iter(GlobalBatchSampler(len(data.train), global_batch, seed=cfg.train.seed, rank=rank, world_size=world,
                                      micro_batch_size=micro, shuffle=cfg.data.shuffle,
                                      samples_consumed=state["samples_consumed"]))
    pad_id = tokenizer.pad_token_id

    def save(at_step: int):  # every rank; the oldest checkpoints past checkpoint.save_total_limit go
        adapter = adapter_state_dict(unwrapped, is_main)

        def extras(staging: Path):  # beside the shards: the adapter, and the config that ran
            save_adapter(unwrapped.peft_model, adapter, staging / "adapter")
            cfg.save(staging / "config.yaml")

        trainer_state = {**state, "global_batch_size": global_batch, "seed": cfg.train.seed,
                         "rng_policy": "reseed(sha256(seed:step:rank)) at every optimizer step",
                         "train_seconds": state.get("train_seconds", 0.0) + meter.elapsed()}  # the whole run's
        result = save_checkpoint(ckpt_root, at_step, model=unwrapped, optimizer=optimizer, scheduler=scheduler,
                                 trainer_state=trainer_state, rank=rank, world_size=world, config_hash=config_hash,
                                 barrier=accelerator.wait_for_everyone, write_extras=extras)
        if is_main:
            rotate(ckpt_root, cfg.checkpoint.save_total_limit, protect=resume_path)
        return result

    tracker = start_tracker(cfg, state, is_main=is_main, world=world, recompute=recompute_plan,
                            resumed=(resume_path, load_s) if resume_path else None, data_report=data.report,
                            dtype=str(compute_dtype).removeprefix("torch."),
                            distributed=str(accelerator.distributed_type).split(".")[-1].lower(),
                            zero_stage=zero_stage(accelerator), requested_zero_stage=stage, zero12_as_ddp=as_ddp,
                            zero3=zero3_filled or None)
    state["tracker_run_id"] = tracker.run_id
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    meter = ThroughputMeter(world_size=world, peak_flops=peak_flops(device_name, cfg.logging.peak_tflops),
                            total_steps=total_steps, start_step=step, device=device,
                            model_config=unwrapped.causal_lm.config, lora_params=trainable_params(unwrapped))
    timer, nonfinite = StepTimer(), NonFiniteSteps(abort=cfg.distributed.nonfinite_loss == "abort",
                                                   max_in_a_row=cfg.distributed.max_consecutive_nonfinite)
    bar = ProgressBar(total_steps, initial=step, is_main=is_main, enabled=cfg.logging.progress_bar)
    reduce_sum = lambda t: accelerator.reduce(t, "sum")
    step_losses, window_losses, eval_losses = [], [], []

    def evaluate_and_log() -> float | None:  # the eval loss at this step, logged (None: a preemption signal)
        if (eval_loss := evaluate(model, data.eval, cfg, accelerator, pad_id, compute_dtype, preemption)) is not None:
            eval_losses.append(eval_loss)
            tracker.log({"eval/loss": eval_loss}, step)
        return eval_loss

    preemption.defer()  # from here a signal only sets a flag: there is state worth saving (before: exit 75 at once)

    # The loop. One iteration = one optimizer step over `accum` micro-batches on every rank.
    model.train()
    while step < total_steps:
        torch.manual_seed(step_seed(cfg.train.seed, step, rank))
        with timer.phase("data"):
            micro_batches, digest = [], 0
            for _ in range(accum):
                indices = next(batches)
                digest += sample_digest(indices)
                samples = [data.train[i] for i in indices]
                micro_batches.append(collate(samples, pad_token_id=pad_id))
                meter.observe(samples, micro_batches[-1])  # this rank's documents, tokens, FLOPs, batch fill
        with timer.phase("comm"):
            counts = reduce_sum(torch.tensor([count_targets(micro_batches), digest], device=device))
            global_tokens, step_digest = (int(x) for x in counts.tolist())
        scale = backward_scale(global_tokens, world, backend.divides_by)

        census = record_kernels() if step == first_step else contextlib.nullcontext()  # what this process runs
        injected_signal("freeze", step, rank, "SIGSTOP")  # test hook: a rank that stops answering
        with timer.phase("fwd_bwd"), census as ran:
            loss_sum = torch.zeros((), dtype=torch.float32, device=device)
            for i, mb in enumerate(micro_batches):
                mb = to_device(mb, device, cfg.data.packing, cfg.model.attn_implementation, compute_dtype)
                with backend.no_sync(last=i == accum - 1):  # gradients are reduced after the last one only
                    s, _ = model(**mb)
                    if injected_fault("nan_loss", step, rank):
                        s = s * float("nan")
                    backend.backward(s * scale)
                loss_sum += s.detach().float()

        if step == first_step:  # the kernel census of this process's first step: an event, a log line
            report_census(ran, kernel_report, tracker, step, cfg.kernels.backend, is_main)
        with timer.phase("optimizer"):
            # no update when the loss (global: every rank decides alike) or the gradient norm is non-finite
            grad_norm, step_loss = backend.clip_and_step(
                lambda total=loss_sum, n=global_tokens: float(reduce_sum(total)) / n)
            state["skipped_steps"] += nonfinite.skipped(step, step_loss, grad_norm)  # or TrainingDiverged
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        step += 1
        state.update(global_step=step, samples_consumed=state["samples_consumed"] + global_batch,
                     tokens_consumed=state["tokens_consumed"] + global_tokens)
        if math.isfinite(step_loss):
            step_losses.append(step_loss)
            window_losses.append(step_loss)
        bar.update(step)

        if step % cfg.logging.logging_steps == 0 or step == total_steps:
            metrics = {
                "train/loss": sum(window_losses) / len(window_losses) if window_losses else float("nan"),
                "train/learning_rate": scheduler.get_last_lr()[0],
                "train/grad_norm": grad_norm,
                "train/skipped_steps": state["skipped_steps"],
                "data/last_step_digest": step_digest,
                "train/epoch": state["samples_consumed"] / (steps_per_epoch * global_batch),
                **meter.compute(step, timer=timer, reduce=reduce_sum),  # data/batch_fill, perf/*, time/*, mem/*
            }
            window_losses = []
            tracker.log(metrics, step)
            bar.log(step, metrics)
        eval_now = data.eval is not None and cfg.train.eval_steps and step % cfg.train.eval_steps == 0
        if eval_now and (eval_loss := evaluate_and_log()) is not None:
            bar.write(f"step {step}: eval loss {eval_loss:.4f}")
        saved = bool(cfg.checkpoint.save_steps) and (step % cfg.checkpoint.save_steps == 0 or step == total_steps)
        if saved and (result := save(step)) is not None:  # None on every rank but 0 (rank 0 commits)
            tracker.log({"checkpoint/save_s": result.seconds, "checkpoint/bytes": result.bytes}, step)
        if preemption.agreed(accelerator):  # every rank sees the same answer at the same step
            if not saved:
                save(step)
            bar.close()
            preemption.requeue(step, tracker=tracker, checkpoint_dir=ckpt_root, barrier=accelerator.wait_for_everyone,
                               is_main=is_main)
    bar.close()
    if cfg.checkpoint.save_steps and step > 0 and not (ckpt_root / step_dir_name(step)).exists():
        save(step)  # the final state, e.g. a run resumed at its last step into a new output directory
    if cfg.checkpoint.save_steps:  # the final checkpoint is committed: a signal from here on ends the process
        preemption.expedite(step)  # (without checkpoints the run finishes its export instead)
    if data.eval is not None and (not eval_losses or not cfg.train.eval_steps or step % cfg.train.eval_steps):
        evaluate_and_log()
    return finish(cfg, unwrapped, tokenizer, accelerator=accelerator, tracker=tracker, meter=meter, state=state,
                  step_losses=step_losses, eval_losses=eval_losses)


def train(config: Config | dict | str | os.PathLike, resume_from_checkpoint: str | None = None) -> TrainOutput:
    """Python API: a `Config`, a dict of sections, or a YAML path -> `TrainOutput`."""
    if isinstance(config, (str, os.PathLike)):
        cfg = load_config(config)
    elif isinstance(config, dict):
        cfg = build_config(config)
    else:
        cfg = config
    if resume_from_checkpoint is not None:  # on a copy: the caller's config stays as it was
        cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(
            cfg.checkpoint, resume_from_checkpoint=str(resume_from_checkpoint)))
    installed = PREEMPTION.install()
    try:
        return main(cfg)
    finally:
        if installed:  # the caller's handlers back
            PREEMPTION.restore()


class _CallableModule(type(sys)):
    """`distsft.train(...)` calls `train(...)` although `distsft.train` is this module (see __init__)."""

    def __call__(self, *args, **kwargs) -> TrainOutput:
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    from distsft.entry import run_to_exit

    run_to_exit(main, _CLI_CONFIG)

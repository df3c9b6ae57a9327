"""distsft: LoRA supervised fine-tuning, one loop for every mode.

    accelerate launch distsft/train.py                                  # the embedded demo
    accelerate launch distsft/train.py --config launch/configs/x.yaml train.learning_rate=1e-4
    python -c "import distsft; distsft.train('launch/configs/x.yaml')"  # the Python API

`main(cfg)` reads top to bottom: accelerator, model, data, optimizer and schedule, prepare, resume,
the loop, export. Everything else is a function in a sibling module taking the sub-config it needs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import sys
import time
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
from distsft.attention import VARLEN_IMPLEMENTATIONS, check_packing_isolation, packed_attention_kwargs
from distsft.census import record_kernels
from distsft.checkpoint import (
    find_resume_checkpoint,
    load_checkpoint,
    rotate,
    save_checkpoint,
    step_dir_name,
    trainable_named_parameters,
)
from distsft.config import Config, build_config, load_config
from distsft.data import GlobalBatchSampler, build_datasets, check_token_ids, collate
from distsft.distributed import (
    REQUEUE_EXIT_CODE,
    PreemptionFlag,
    TrainingDiverged,
    build_accelerator,
    configure_deepspeed,
    deepspeed_engine,
    gathered_parameters,
    injected_fault,
    prepare_zero3,
    register_head_for_zero3,
    requested_deepspeed,
    sample_digest,
    write_exit_status,
    zero12_as_ddp,
    zero_stage,
)
from distsft.export import export_adapter, save_adapter, trainable_state_dict
from distsft.flops import doc_lengths_from_position_ids, peak_flops, train_flops, trainable_params
from distsft.lifecycle import PREEMPTION, injected_signal
from distsft.logs import setup_logging
from distsft.loss import backward_scale, count_targets, target_indices
from distsft.model import (
    build_model,
    load_tokenizer,
    merged_model,
    trainable_numel_on_meta,
    trainable_parameter_count,
)
from distsft.optim import build_optimizer, build_scheduler
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


def report_kernel_census(census, report, tracker, step: int, backend: str, is_main: bool) -> None:
    """After the first step: which path every patched module ran, as the `kernels` event and one log
    line, and a warning per reason for everything that did not run our kernel, from the main process
    for every rank (a collective: the census of each rank is gathered)."""
    from accelerate.utils import gather_object

    mine = census.as_dict(report)
    ranks = gather_object([mine])
    short = {rank: r["missing"] for rank, r in enumerate(ranks) if r["missing"]}
    tracker.event("kernels", step, **mine, ranks_short=short or None)
    if not is_main:
        return
    logger.info("kernels run in step %d: %s", step + 1, census.summary(report))
    for msg in census.fallback_warnings():
        (logger.info if backend == "torch" else logger.warning)("%s", msg)
    differ = {rank: r["ran"] for rank, r in enumerate(ranks) if r["ran"] != mine["ran"]}
    if differ:
        logger.warning("kernels: other ranks ran other paths in step %d than rank 0 (%s): %s", step + 1,
                       mine["ran"], differ)


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
                batch["target_ids"].fill_(-100)
            batch = to_device(batch, accelerator.device, cfg.data.packing, cfg.model.attn_implementation, dtype)
            s, n = model(**batch)
            loss_sum += s.double()
            count += n.double()
    model.train()
    loss_sum, count = accelerator.reduce(torch.stack([loss_sum, count]), "sum")
    return float(loss_sum / count.clamp(min=1))


def main(cfg: Config) -> TrainOutput:
    preemption = PREEMPTION  # a signal before the loop ends the process at once (distsft/lifecycle.py)
    preemption.install()  # a no-op when the entry point installed it at process start
    preflight(cfg)  # paths, tokenizer, trackers, output directory: one line naming the key, before any work
    # ZeRO-1/2 with a small trainable state run as DDP (distributed.zero12): decided before the process
    # group exists, from the trainable count of a meta-device skeleton.
    ds_request = requested_deepspeed(cfg.distributed)
    stage = int((ds_request or {}).get("zero_optimization", {}).get("stage", 0))
    as_ddp = zero12_as_ddp(cfg.distributed, ds_request, trainable_numel_on_meta(cfg.model, cfg.lora)
                           if stage in (1, 2) and cfg.distributed.zero12 == "auto" else None,
                           int(os.environ.get("WORLD_SIZE", "1")))
    accelerator = build_accelerator(cfg, as_ddp=as_ddp is not None)
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    setup_logging(is_main=is_main, rank=rank)
    if as_ddp is not None:
        logger.info("distributed: running the ZeRO-%d config as DDP (distributed.zero12=%s): %s; "
                    "distributed.zero12=deepspeed keeps DeepSpeed", stage, cfg.distributed.zero12, as_ddp)
    out_dir = Path(cfg.train.output_dir)
    ckpt_root = out_dir / "checkpoints"
    if is_main:
        prepare_output_dir(cfg)  # nothing is written into the output directory before this point
    config_hash = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
    torch.manual_seed(cfg.train.seed)

    # Model: HF causal LM -> LoRA -> our kernels on this instance -> the module that owns head + loss.
    device = accelerator.device
    cfg.model.attn_implementation = attention.resolve(cfg.model.attn_implementation, device)
    tokenizer = load_tokenizer(cfg.model)

    # Data: tokenised once (main process first), packed, and ordered independently of the world size.
    # Before the model: a bad row or a dataset too small for one step must not wait for an 8B model to load.
    data = build_datasets(
        cfg.data, tokenizer, seed=cfg.train.seed, output_dir=str(out_dir),
        main_process_first=accelerator.main_process_first, is_main_process=is_main,
    )
    micro, accum = cfg.train.per_device_train_batch_size, cfg.train.gradient_accumulation_steps
    global_batch = micro * accum * world
    steps_per_epoch = len(data.train) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(
            f"train.per_device_train_batch_size: the training set packs into {len(data.train)} sequences, "
            f"fewer than one global batch of {global_batch} (train.per_device_train_batch_size {micro} x "
            f"train.gradient_accumulation_steps {accum} x {world} processes); lower them or add data"
        )
    total_steps = cfg.train.max_steps if cfg.train.max_steps > 0 else math.ceil(
        cfg.train.num_train_epochs * steps_per_epoch)

    model, kernel_report = build_model(cfg.model, cfg.lora, cfg.kernels, device, seed=cfg.train.seed)
    injected_signal("sigterm_after_model", 0, rank, "SIGTERM")
    check_token_ids(data, model.causal_lm.get_input_embeddings().num_embeddings, tokenizer)
    compute_dtype = next(model.causal_lm.parameters()).dtype
    trainable, total = trainable_parameter_count(model)
    logger.info("model: %s trainable of %s parameters (%.3f%%); kernels: %s",
                f"{trainable:,}", f"{total:,}", 100 * trainable / total, kernel_report)

    optimizer = build_optimizer(model, cfg.train, device)
    scheduler = build_scheduler(optimizer, cfg.train, total_steps)
    configure_deepspeed(accelerator, micro_batch=micro, accum=accum, max_grad_norm=cfg.train.max_grad_norm,
                        dtype=compute_dtype)
    zero3_filled = prepare_zero3(accelerator, model, decoder_layers(model), model.causal_lm.get_input_embeddings(),
                                 cfg.distributed.zero3_gather)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    engine = deepspeed_engine(accelerator, model)  # DeepSpeed drives backward and step itself
    if cfg.checkpoint.save_merged and zero_stage(accelerator) == 3:
        raise ValueError("checkpoint.save_merged=true is not supported under ZeRO-3 (the base weights are "
                         "partitioned); merge the exported adapter into the base model after training")
    register_head_for_zero3(unwrapped)
    recompute_plan = setup_recomputation(unwrapped, cfg.model, micro_batch=micro, seq_len=cfg.data.max_seq_len,
                                         packing=cfg.data.packing, fused_loss=cfg.kernels.fused_linear_cross_entropy)
    # Refuse an attention backend that lets packed documents see each other (a probe batch, a few ms).
    # After prepare: under ZeRO-3 the engine's hooks gather the weights (every rank runs it).
    if cfg.data.packing:
        impl = cfg.model.attn_implementation

        def probe(ids, pos, mask):
            kw = {} if mask is None else {"attention_mask": mask.to(device)}
            if impl in VARLEN_IMPLEMENTATIONS:
                kw = packed_attention_kwargs(pos, impl, compute_dtype)  # document lengths, not a mask
            return unwrapped.logits(ids.to(device), pos.to(device), **kw)

        check_packing_isolation(unwrapped.causal_lm, attn_implementation=impl, forward=probe)

    # Resume: the trainable state, optimizer, schedule and the data position (a global sample count).
    state = {"global_step": 0, "samples_consumed": 0, "tokens_consumed": 0, "skipped_steps": 0}
    # Rank 0 chooses (and verifies) the checkpoint; every rank then loads that one, whatever its view
    # of a shared filesystem says. If rank 0 fails here, torchrun ends the others at once.
    resume_path = broadcast_object_list(
        [find_resume_checkpoint(out_dir, cfg.checkpoint.resume_from_checkpoint) if is_main else None])[0]
    if resume_path is not None:
        load_started = time.perf_counter()
        state = load_checkpoint(resume_path, model=unwrapped, optimizer=optimizer, scheduler=scheduler)
        load_s = time.perf_counter() - load_started
        if state["global_batch_size"] != global_batch and not cfg.distributed.allow_global_batch_change:
            raise ValueError(
                f"{resume_path} was trained with a global batch of {state['global_batch_size']}, this run has "
                f"{global_batch}: each step would see other samples. Keep per_device_train_batch_size x "
                "gradient_accumulation_steps x processes constant, or set distributed.allow_global_batch_change=true"
            )
        logger.info("resumed from %s at step %d (%d samples consumed)",
                    resume_path, state["global_step"], state["samples_consumed"])
    step = state["global_step"]
    sampler = GlobalBatchSampler(
        len(data.train), global_batch, seed=cfg.train.seed, rank=rank, world_size=world,
        micro_batch_size=micro, shuffle=cfg.data.shuffle, samples_consumed=state["samples_consumed"],
    )
    batches = iter(sampler)
    pad_id = tokenizer.pad_token_id
    engine_divides_by = accum if engine is not None else 1

    def adapter_state_dict() -> dict | None:
        """The adapter's tensors, whole, on the main process (a collective under ZeRO-3)."""
        with gathered_parameters([p for _, p in trainable_named_parameters(unwrapped)]):
            if not is_main:
                return None
            return trainable_state_dict(unwrapped.peft_model)  # unfiltered: save_adapter filters once

    def save(at_step: int):
        adapter = adapter_state_dict()

        def extras(staging: Path):
            save_adapter(unwrapped.peft_model, adapter, staging / "adapter")
            cfg.save(staging / "config.yaml")

        trainer_state = {**state, "global_batch_size": global_batch, "seed": cfg.train.seed,
                         "rng_policy": "reseed(sha256(seed:step:rank)) at every optimizer step",
                         "train_seconds": state.get("train_seconds", 0.0) + meter.elapsed()}  # the whole run's
        result = save_checkpoint(
            ckpt_root, at_step, model=unwrapped, optimizer=optimizer, scheduler=scheduler,
            trainer_state=trainer_state, rank=rank, world_size=world, barrier=accelerator.wait_for_everyone,
            write_extras=extras, config_hash=config_hash,
        )
        if is_main:
            rotate(ckpt_root, cfg.checkpoint.save_total_limit, protect=resume_path)
        return result

    # Trackers: one run id for all ranks, continued from the checkpoint on resume.
    run_id = state.get("tracker_run_id") or broadcast_object_list([new_run_id() if is_main else None])[0]
    tracker = Tracker(cfg.logging, str(out_dir), is_main=is_main, config_dict=cfg.to_dict(), run_id=run_id,
                      world_size=world, start_step=step if resume_path else None)
    if recompute_plan is not None:
        tracker.event("recomputation", step, offload=cfg.model.offload_checkpoints, **recompute_plan.event_fields())
    state["tracker_run_id"] = tracker.run_id
    tracker.event("model", step, dtype=str(compute_dtype).removeprefix("torch."),
                  distributed=str(accelerator.distributed_type).split(".")[-1].lower(),
                  zero_stage=zero_stage(accelerator), requested_zero_stage=stage, zero12_as_ddp=as_ddp,
                  zero3=zero3_filled or None)
    if resume_path is not None:
        tracker.event("resumed", step, path=str(resume_path), from_world_size=state["world_size"])
        tracker.log({"checkpoint/load_s": load_s}, step)
        if state["world_size"] != world:
            tracker.event("world_size_changed", step, before=state["world_size"], after=world)
    tracker.log({f"data/{k}": v for k, v in data.report.as_dict()["train"].items() if isinstance(v, (int, float))},
                step)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    meter = ThroughputMeter(world_size=world, peak_flops=peak_flops(device_name, cfg.logging.peak_tflops),
                            total_steps=total_steps, start_step=step, device=device)
    timer = StepTimer()
    bar = ProgressBar(total_steps, initial=step, is_main=is_main, enabled=cfg.logging.progress_bar)
    reduce_sum = lambda t: accelerator.reduce(t, "sum")
    hf_config, lora_params = unwrapped.causal_lm.config, trainable_params(unwrapped)
    step_losses, window_losses, eval_losses, nonfinite_run = [], [], [], 0
    census_pending = True
    window_real = window_slots = 0  # non-padding tokens / (rows x padded length) fed to the model

    # From here on SIGTERM/SIGUSR1 only set a flag: there is state worth saving. (Before, during data
    # preparation and model loading, a signal ends the process at once with 75: nothing is lost.)
    preemption.defer()

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
                mb = collate(samples, pad_token_id=pad_id)
                lengths = torch.tensor([len(x["input_ids"]) for x in samples])
                real = torch.arange(mb["input_ids"].shape[1]) < lengths[:, None]  # (B, T) not padding
                docs = doc_lengths_from_position_ids(mb["position_ids"], real)
                meter.update(samples=len(docs), input_tokens=int(lengths.sum()),
                             label_tokens=count_targets([mb]),
                             flops=train_flops(hf_config, docs, lora_params=lora_params))
                micro_batches.append(mb)
                window_real, window_slots = window_real + int(lengths.sum()), window_slots + real.numel()
        with timer.phase("comm"):
            counts = reduce_sum(torch.tensor([count_targets(micro_batches), digest], device=device))
            global_tokens, step_digest = (int(x) for x in counts.tolist())
        scale = backward_scale(global_tokens, world, engine_divides_by)

        # The first step of this process counts which path every patched module takes (kernel census).
        census = record_kernels() if census_pending else contextlib.nullcontext()
        injected_signal("freeze", step, rank, "SIGSTOP")  # test hook: a rank that stops answering
        with timer.phase("fwd_bwd"), census as ran:
            loss_sum = torch.zeros((), dtype=torch.float32, device=device)
            for i, mb in enumerate(micro_batches):
                mb = to_device(mb, device, cfg.data.packing, cfg.model.attn_implementation, compute_dtype)
                last = i == accum - 1
                if engine is not None:  # tells ZeRO which backward ends the step (it then reduces)
                    engine.set_gradient_accumulation_boundary(last)
                # DDP: all-reduce on the last micro-batch only.
                with contextlib.nullcontext() if last or engine is not None else accelerator.no_sync(model):
                    s, _ = model(**mb)
                    if injected_fault("nan_loss", step, rank):
                        s = s * float("nan")
                    (engine.backward if engine is not None else accelerator.backward)(s * scale)
                loss_sum += s.detach().float()

        if census_pending:
            census_pending = False
            report_kernel_census(ran, kernel_report, tracker, step, cfg.kernels.backend, is_main)
        with timer.phase("optimizer"):
            # Non-finite loss or gradients: decided on global values, so every rank takes the same branch.
            step_loss = float(reduce_sum(loss_sum)) / global_tokens
            if engine is not None:
                # DeepSpeed clips (gradient_clipping = train.max_grad_norm) and steps inside engine.step();
                # with non-finite gradients its overflow check skips the update on every rank.
                engine.step()
                grad_norm = float(engine.get_global_grad_norm() or 0.0)
            else:
                max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else float("inf")
                grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
            if math.isfinite(step_loss) and math.isfinite(grad_norm):
                if engine is None:
                    optimizer.step()
                nonfinite_run = 0
            else:
                state["skipped_steps"] += 1
                nonfinite_run += 1
                logger.warning("step %d: non-finite loss %s / grad norm %s: optimizer step skipped",
                               step, step_loss, grad_norm)
                if (cfg.distributed.nonfinite_loss == "abort"
                        or nonfinite_run >= cfg.distributed.max_consecutive_nonfinite):
                    raise TrainingDiverged(f"step {step}: {nonfinite_run} non-finite step(s) in a row")
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
                "data/batch_fill": window_real / max(1, window_slots),
                **meter.compute(step, timer=timer, reduce=reduce_sum),
            }
            window_losses, window_real, window_slots = [], 0, 0
            tracker.log(metrics, step)
            bar.log(step, metrics)
        if data.eval is not None and cfg.train.eval_steps and step % cfg.train.eval_steps == 0:
            eval_loss = evaluate(model, data.eval, cfg, accelerator, pad_id, compute_dtype, preemption)
            if eval_loss is not None:
                eval_losses.append(eval_loss)
                tracker.log({"eval/loss": eval_loss}, step)
                bar.write(f"step {step}: eval loss {eval_loss:.4f}")
        saved = False
        if cfg.checkpoint.save_steps and (step % cfg.checkpoint.save_steps == 0 or step == total_steps):
            result, saved = save(step), True
            if result is not None:
                tracker.log({"checkpoint/save_s": result.seconds, "checkpoint/bytes": result.bytes}, step)
        if preemption.agreed(accelerator):  # every rank sees the same answer at the same step
            if not saved:
                result = save(step)
            tracker.event("preempted", step, signal=preemption.signum, checkpoint=str(ckpt_root))
            if is_main:
                write_exit_status("preempted", REQUEUE_EXIT_CODE, step)
            tracker.close(exit_code=REQUEUE_EXIT_CODE)
            bar.close()
            logger.warning("preempted: checkpoint at step %d committed; exiting with %d for requeue",
                           step, REQUEUE_EXIT_CODE)
            accelerator.wait_for_everyone()  # then every rank exits at once (distsft.entry.run_to_exit)
            raise SystemExit(REQUEUE_EXIT_CODE)
    bar.close()
    if cfg.checkpoint.save_steps and step > 0 and not (ckpt_root / step_dir_name(step)).exists():
        save(step)  # the final state, e.g. a run resumed at its last step into a new output directory
    if cfg.checkpoint.save_steps:  # the final checkpoint is committed: a signal from here on ends the process
        preemption.expedite(step)  # (without checkpoints the run finishes its export instead)

    if data.eval is not None and (not eval_losses or not cfg.train.eval_steps or step % cfg.train.eval_steps):
        eval_loss = evaluate(model, data.eval, cfg, accelerator, pad_id, compute_dtype, preemption)
        if eval_loss is not None:
            eval_losses.append(eval_loss)
            tracker.log({"eval/loss": eval_loss}, step)

    # Export: the adapter in PEFT format plus the tokenizer and a model card; optionally the merged model.
    window = step_losses[-cfg.logging.logging_steps:]  # the loss the summary reports: the last logging window
    last_window_loss = sum(window) / len(window) if window else None
    adapter, adapter_dir = adapter_state_dict(), out_dir / "adapter"
    if is_main:
        export_adapter(unwrapped.peft_model, adapter, adapter_dir, cfg=cfg, tokenizer=tokenizer, device=device,
                       steps=step, train_loss=last_window_loss, eval_loss=eval_losses[-1] if eval_losses else None,
                       world_size=world)
        if cfg.checkpoint.save_merged:
            merged = merged_model(unwrapped.peft_model)
            merged.save_pretrained(out_dir / "merged")
            tokenizer.save_pretrained(out_dir / "merged")
            logger.info("merged model written to %s", out_dir / "merged")
    accelerator.wait_for_everyone()

    summary = print_summary(
        meter.totals(step, reduce=reduce_sum), train_loss=last_window_loss, train_loss_steps=len(window),
        final_eval_loss=eval_losses[-1] if eval_losses else None, best_eval_loss=min(eval_losses, default=None),
        run_label_tokens=state["tokens_consumed"], run_train_seconds=state.get("train_seconds", 0.0) + meter.elapsed(),
        adapter_dir=str(adapter_dir), enabled=is_main,
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


def train(config: Config | dict | str | os.PathLike, resume_from_checkpoint: str | None = None) -> TrainOutput:
    """Python API: a `Config`, a dict of sections, or a YAML path -> `TrainOutput`."""
    if isinstance(config, (str, os.PathLike)):
        cfg = load_config(config)
    elif isinstance(config, dict):
        cfg = build_config(config)
    else:
        cfg = config
    if resume_from_checkpoint is not None:
        cfg.checkpoint.resume_from_checkpoint = str(resume_from_checkpoint)
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

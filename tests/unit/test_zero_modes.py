"""How a DeepSpeed launch runs (issue 18): ZeRO-1/2 as DDP when partitioning would save little, what the
run asked for, and how ZeRO-3 is prepared to gather whole decoder layers. Pure functions and a tiny model;
the multi-process behaviour is in tests/integration/test_distributed.py."""

import json
from types import SimpleNamespace

import pytest
import torch
from _support import REPO

from distsft.config import DistributedConfig, LoraConfig, ModelConfig
from distsft.distributed import ZERO3_PERSISTENCE_CAP, prepare_zero3, requested_deepspeed, zero12_as_ddp


def _ds(stage: int, **zero) -> dict:
    return {"zero_optimization": {"stage": stage, **zero}}


def test_zero12_runs_as_ddp_only_when_partitioning_saves_little():
    auto = DistributedConfig()
    lora_8b = 41_943_040  # Llama-3.1-8B, r=16 on all seven projections
    assert "ZeRO-2 would partition only the trainable state (41,943,040 parameters" in zero12_as_ddp(
        auto, _ds(2), lora_8b, 8)
    assert zero12_as_ddp(auto, _ds(1), lora_8b, 1) is not None  # one GPU: nothing is partitioned at all
    assert zero12_as_ddp(auto, _ds(2), 1_000_000_000, 8) is None  # 1B trained parameters: 10.5 GiB saved
    assert zero12_as_ddp(auto, _ds(2), 1_000_000_000, 1) is not None  # ... but not on one GPU
    assert zero12_as_ddp(auto, _ds(2, offload_optimizer={"device": "cpu"}), lora_8b, 8) is None  # DeepSpeed's saving
    assert zero12_as_ddp(auto, _ds(2, offload_optimizer={"device": "none"}), lora_8b, 8) is not None
    assert zero12_as_ddp(auto, _ds(3), lora_8b, 8) is None  # ZeRO-3 partitions the base model
    assert zero12_as_ddp(auto, None, lora_8b, 8) is None
    assert zero12_as_ddp(auto, _ds(2), None, 8) is None  # unknown size: keep what was asked for
    assert zero12_as_ddp(DistributedConfig(zero12="deepspeed"), _ds(2), lora_8b, 8) is None
    assert zero12_as_ddp(DistributedConfig(zero12="ddp"), _ds(2), 10**10, 8) == "distributed.zero12=ddp"


def test_requested_deepspeed_from_the_config_or_accelerate_launch(monkeypatch, tmp_path):
    for var in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_CONFIG_FILE", "ACCELERATE_DEEPSPEED_ZERO_STAGE",
                "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"):
        monkeypatch.delenv(var, raising=False)
    assert requested_deepspeed(DistributedConfig()) is None
    path = str(REPO / "ds_configs" / "zero2.json")
    assert requested_deepspeed(DistributedConfig(deepspeed_config=path))["zero_optimization"]["stage"] == 2
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # `accelerate launch --config_file zero3.yaml`
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(REPO / "ds_configs" / "zero3.json"))
    assert requested_deepspeed(DistributedConfig())["zero_optimization"]["stage"] == 3
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")  # a YAML with the stage inline
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    assert requested_deepspeed(DistributedConfig()) == {
        "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}}
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="distributed.deepspeed_config: cannot read .*bad.json"):
        requested_deepspeed(DistributedConfig(deepspeed_config=str(tmp_path / "bad.json")))


@pytest.fixture
def tiny(tmp_path):
    from _support import write_tiny_llama

    from distsft.config import KernelsConfig
    from distsft.model import build_model

    cfg = ModelConfig(init_from_config=str(write_tiny_llama(tmp_path / "m")), dtype="float32",
                      attn_implementation="eager")
    model, _ = build_model(cfg, LoraConfig(r=8), KernelsConfig(backend="torch"), torch.device("cpu"), seed=0)
    return cfg, model


def _accelerator(stage: int, zero: dict):
    ds = {"zero_optimization": {"stage": stage, **zero}}
    plugin = SimpleNamespace(zero_stage=stage, deepspeed_config=ds)
    return SimpleNamespace(distributed_type="DEEPSPEED", state=SimpleNamespace(deepspeed_plugin=plugin)), ds


def test_trainable_count_on_a_meta_skeleton_is_the_real_one(tiny):
    from distsft.model import trainable_numel_on_meta, trainable_parameter_count

    cfg, model = tiny
    assert trainable_numel_on_meta(cfg, LoraConfig(r=8)) == trainable_parameter_count(model)[0] == 16_384
    with_head = LoraConfig(r=8, modules_to_save=["lm_head"])
    assert trainable_numel_on_meta(cfg, with_head) == 16_384 + model.causal_lm.config.vocab_size * 64


def test_prepare_zero3_gathers_whole_layers_and_sizes_the_auto_values(tiny):
    """`zero3_gather=layer`: every decoder layer a DeepSpeed leaf module, the JSON's auto values sized to a
    layer (an explicit value kept), the LoRA tensors below the persistence threshold, the embedding's
    output requiring grad, and each layer's and the model's parameter list computed once and equal to
    the walk it replaces."""
    from distsft.recompute import decoder_layers

    _, model = tiny
    layers = decoder_layers(model)
    walks = [list(m.named_parameters()) for m in (*layers, model)]
    acc, ds = _accelerator(3, {"stage3_prefetch_bucket_size": "auto", "stage3_max_live_parameters": 123,
                               "stage3_param_persistence_threshold": "auto"})
    filled = prepare_zero3(acc, model, layers, model.causal_lm.get_input_embeddings(), "layer")
    layer_numel = sum(p.numel() for p in layers[0].parameters())
    largest_lora = max(p.numel() for p in model.parameters() if p.requires_grad)
    assert filled == {"stage3_prefetch_bucket_size": layer_numel, "stage3_max_reuse_distance": 10**9,
                      "stage3_param_persistence_threshold": largest_lora}
    assert ds["zero_optimization"]["stage3_max_live_parameters"] == 123  # the JSON's own value
    assert all(layer._z3_leaf for layer in layers) and not getattr(model, "_z3_leaf", False)
    for m, walk in zip((*layers, model), walks, strict=True):
        assert list(m.named_parameters()) == walk and [n for n, _ in m.named_parameters(prefix="x")] == [
            f"x.{n}" for n, _ in walk]
        assert list(m.parameters()) == [p for _, p in walk]
    ids = torch.zeros(1, 3, dtype=torch.long)
    assert model.causal_lm.get_input_embeddings()(ids).requires_grad
    assert largest_lora <= ZERO3_PERSISTENCE_CAP


def test_prepare_zero3_does_nothing_elsewhere(tiny):
    from distsft.recompute import decoder_layers

    _, model = tiny
    layers = decoder_layers(model)
    acc, ds = _accelerator(2, {})
    assert prepare_zero3(acc, model, layers, model.causal_lm.get_input_embeddings(), "layer") == {}
    acc, ds = _accelerator(3, {"stage3_prefetch_bucket_size": "auto"})
    assert prepare_zero3(acc, model, layers, model.causal_lm.get_input_embeddings(), "module") == {}
    assert not any(getattr(layer, "_z3_leaf", False) for layer in layers)
    assert "named_parameters" not in layers[0].__dict__
    assert json.dumps(ds)  # untouched, still serialisable


def test_trees_listed_once_are_the_walks(tiny):
    """`walk_once`: the same modules and parameters, names and order as the walk, for every prefix,
    duplicate and recursion setting, positional or by keyword; the second call returns the list made by
    the first; a caller's own memo still walks; deleting the instance attribute undoes it."""
    from distsft.zero3_host import walk_once

    _, model = tiny
    calls = {"named_modules": [((), {"prefix": p, "remove_duplicate": d}) for p in ("", "root") for d in (True, False)]
             + [((None, "x"), {})],
             "named_parameters": [((), {"prefix": p, "recurse": r}) for p in ("", "m") for r in (True, False)]
             + [(("m", False), {})]}

    def ids(named):
        return [(n, id(x)) for n, x in named]

    walked = {m: [ids(getattr(model, m)(*a, **k)) for a, k in cs] for m, cs in calls.items()}
    for method in calls:
        walk_once(model, method)
    for method, cs in calls.items():
        for _ in range(2):
            assert [ids(getattr(model, method)(*a, **k)) for a, k in cs] == walked[method]
        assert getattr(model, method)(**cs[0][1]) is not getattr(model, method)(**cs[0][1])  # fresh iterators
    assert [id(m) for m in model.modules()] == [i for _, i in walked["named_modules"][0]]
    assert [id(p) for p in model.parameters()] == [i for _, i in walked["named_parameters"][0]]
    memo = set()
    assert len(list(model.named_modules(memo=memo))) == len(walked["named_modules"][0]) and memo
    model.add_module("extra", torch.nn.Linear(2, 2))
    listed_call = calls["named_modules"][0][1]  # a module added after listing is not seen: the limit
    assert "extra" not in dict(model.named_modules(**listed_call))
    del model.named_modules, model.named_parameters  # undone by deleting the instance attributes
    assert "extra" in dict(model.named_modules()) and "extra.weight" in dict(model.named_parameters())


def test_quiet_debug_prints_print_what_deepspeed_printed(capsys, monkeypatch):
    """The stage-3 debug prints still print when forced, and only then (rank 0 in one process)."""
    import importlib

    from distsft.zero3_host import _quiet_debug_prints

    names = ("partition_parameters", "partitioned_param_coordinator", "parameter_offload", "stage3")
    modules = [importlib.import_module(f"deepspeed.runtime.zero.{n}") for n in names]
    for module in modules:  # DeepSpeed's own, restored after the test
        monkeypatch.setattr(module, "print_rank_0", getattr(module.print_rank_0, "original", module.print_rank_0))
    calls = []
    monkeypatch.setattr("deepspeed.comm.get_rank", lambda *a, **k: calls.append(1) or 0)
    assert _quiet_debug_prints()
    wrapped = [m.print_rank_0 for m in modules]
    assert _quiet_debug_prints() and [m.print_rank_0 for m in modules] == wrapped  # once per process
    pp = modules[0]
    pp.print_rank_0("quiet", force=False)
    assert calls == [] and capsys.readouterr().out == ""  # no rank lookup, no output
    pp.print_rank_0("loud", force=True)
    assert calls == [1] and capsys.readouterr().out == "loud\n"


def test_one_rank_gradients_go_to_the_current_slots(monkeypatch):
    """At one rank `_one_rank_partitions` copies a layer's gradients into their slots of the flat fp32
    buffer (adds them while accumulating), frees them and marks them for the step; it reads DeepSpeed's
    map of slots at each call, so after the map is replaced (DeepSpeed's `reload_states` builds a new one
    over a moved buffer) the gradients go to the new slots, and with no slot for a gradient it declines
    (DeepSpeed's bucket path runs)."""
    import deepspeed.comm

    from distsft.zero3_host import _one_rank_partitions

    monkeypatch.setattr(deepspeed.comm, "get_world_size", lambda group=None: 1)
    key = "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition"

    def slots_over(buffer):
        return {0: buffer.narrow(0, 0, 6), 1: buffer.narrow(0, 6, 4)}

    first = torch.zeros(10)
    optimizer = SimpleNamespace(**{key: slots_over(first)}, dp_process_group=None, micro_step_id=0,
                                _offload_boundary_param_ids=set(), gradient_accumulation_dtype=torch.float32,
                                offload_optimizer=False, postscale_gradients=False, gradient_predivide_factor=1.0)
    shapes = [(2, 3), (4,)]
    params = [SimpleNamespace(ds_id=i, ds_numel=6 if i == 0 else 4, ds_shape=torch.Size(shape), grad=None,
                              partition_numel=lambda i=i: 6 if i == 0 else 4) for i, shape in enumerate(shapes)]
    straight = _one_rank_partitions(optimizer)

    def backward(values):
        grads = [torch.tensor(values[:6]).view(2, 3), torch.tensor(values[6:])]
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        return straight(params, torch.float32, None)

    assert backward([float(v) for v in range(10)])
    assert first.tolist() == list(range(10)) and all(p.grad is None for p in params)
    assert optimizer._offload_boundary_param_ids == {0, 1}
    optimizer.micro_step_id = 1  # accumulating: added
    assert backward([1.0] * 10) and first.tolist() == [v + 1.0 for v in range(10)]
    second = torch.zeros(10)
    setattr(optimizer, key, slots_over(second))  # the map replaced: the new slots, the old buffer untouched
    optimizer.micro_step_id = 0
    assert backward([2.0] * 10) and second.tolist() == [2.0] * 10 and first.tolist() == [v + 1.0 for v in range(10)]
    setattr(optimizer, key, {})  # no slots (offloaded state): declined, the gradients stay
    assert not backward([3.0] * 10) and all(p.grad is not None for p in params)


def test_reassign_after_the_update_repoints_only_what_is_not_a_view_in_order():
    """After the update DeepSpeed copies the fp32 partitions into the flat low-precision buffer and makes
    every partition a view of it again; `_reassign_partitions` copies and re-points (by DeepSpeed's own
    method) only where a partition is not already that view, in order."""
    from torch._utils import _unflatten_dense_tensors

    from distsft.zero3_host import _reassign_partitions, _views_in_order

    flat = torch.zeros(10, dtype=torch.bfloat16)
    parts = [t.clone() for t in _unflatten_dense_tensors(flat, [torch.empty(4), torch.empty(6)])]
    calls = []

    def unflatten(sub_group_id):
        calls.append(sub_group_id)
        for t, view in zip(parts, _unflatten_dense_tensors(flat, parts), strict=True):
            t.data = view.data

    optimizer = SimpleNamespace(fp16_partitioned_groups_flat=[flat], fp16_partitioned_groups=[parts],
                                fp32_partitioned_groups_flat=[torch.arange(10, dtype=torch.float32)],
                                _unflatten_partitioned_parameters=unflatten)
    assert not _views_in_order(flat, parts)  # copies: re-pointed on the first step
    _reassign_partitions(optimizer, 0)
    assert calls == [0] and _views_in_order(flat, parts)
    assert parts[0].tolist() == [0, 1, 2, 3] and parts[1].tolist() == list(range(4, 10))
    optimizer.fp32_partitioned_groups_flat[0] += 10  # the next update: views already, only the copy
    _reassign_partitions(optimizer, 0)
    assert calls == [0] and parts[1].tolist() == list(range(14, 20))
    assert not _views_in_order(flat, parts[::-1])  # out of order
    parts[1].data = parts[1].data.clone()  # one moved (a reload): re-pointed again
    _reassign_partitions(optimizer, 0)
    assert calls == [0, 0] and parts[1].tolist() == list(range(14, 20)) and _views_in_order(flat, parts)
    swapped = SimpleNamespace(fp16_partitioned_groups_flat=[None],
                              _reassign_or_swap_out_partitioned_parameters=lambda i: calls.append(("swap", i)))
    _reassign_partitions(swapped, 0)  # no flat buffer (NVMe): DeepSpeed's own method
    assert calls[-1] == ("swap", 0)


def test_zero_plus_plus_and_nvme_keep_deepspeeds_gathering():
    """`LayerGather` and the coalesced persistent gather do the plain coalesced all-gather only: with ZeRO++
    quantized weights (all, or the frozen ones), its secondary partitions (hpZ), or parameters swapped to
    NVMe, or internals that do not say, DeepSpeed's own gathering stays."""
    from types import SimpleNamespace

    from distsft.zero3_host import _needs_deepspeeds_gathering

    def offload(**changes):
        return SimpleNamespace(**{"zero_quantized_weights": False, "zero_quantized_nontrainable_weights": False,
                                  "zero_param_parallel_group": None, "offload_device": None, **changes})

    engine = SimpleNamespace(optimizer=SimpleNamespace(zero_hpz_partition_size=1))
    assert not _needs_deepspeeds_gathering(engine, offload())
    assert not _needs_deepspeeds_gathering(engine, offload(offload_device="cpu"))
    for changes in ({"zero_quantized_weights": True}, {"zero_quantized_nontrainable_weights": True},
                    {"zero_param_parallel_group": object()}, {"offload_device": "nvme"}):
        assert _needs_deepspeeds_gathering(engine, offload(**changes)), changes
    assert _needs_deepspeeds_gathering(SimpleNamespace(optimizer=SimpleNamespace(zero_hpz_partition_size=8)),
                                       offload())
    unknown = offload()
    del unknown.zero_quantized_weights  # a DeepSpeed whose internals differ: not ours to gather
    assert _needs_deepspeeds_gathering(engine, unknown)


def _leave(dist) -> None:
    """End a spawned gloo worker whose results are saved: wait for every rank, then exit without running
    the interpreter's teardown, where a worker once aborted in CI ("terminate called without an active
    exception": a native thread of the CPU backend destroyed while joinable) after its work was done."""
    import os
    import sys

    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _reduce_scatter_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import os
    from types import SimpleNamespace

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.comm as dist
    from deepspeed.runtime.comm.coalesced_collectives import reduce_scatter_coalesced

    from distsft.zero3_host import _coalesced_reduce_scatter

    dist.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, init_method=f"file://{init_file}",
                          rank=rank, world_size=world)
    torch.manual_seed(rank)  # every rank its own gradients
    sizes = (7, 12, 1, 5, 30, 2, 9)  # padded at 2 and 3 ranks, a gradient shorter than the ranks
    params = []
    for n in sizes:
        p = torch.nn.Parameter(torch.empty(n))
        p.grad = torch.randn(n)
        params.append(p)
    theirs = reduce_scatter_coalesced([p.grad.clone() for p in params], None)
    calls = []
    optimizer = SimpleNamespace(
        _DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads=lambda ps, dtype: calls.append(dtype),
        _get_param_partition_group=lambda p: None, _assert_same_partition_group=lambda ps: None,
        _autoep_expert_parallel_group=lambda ps: None, dtype=torch.float32,
        gradient_accumulation_dtype=torch.float32, postscale_gradients=False, gradient_predivide_factor=1.0)
    assert _coalesced_reduce_scatter(optimizer)
    ours = optimizer._DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads(params, torch.float32)
    assert not calls  # ours ran, not the fallback
    optimizer._DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads(params, torch.bfloat16)
    assert calls == [torch.bfloat16]  # another communication dtype: DeepSpeed's method
    torch.save({"ours": ours, "theirs": theirs}, f"{out_dir}/rank{rank}.pt")
    _leave(dist)


@pytest.mark.parametrize("world", [2, 3])
def test_coalesced_reduce_scatter_equals_deepspeeds(tmp_path, world):
    """The bucket reduce-scatter built with one split per gradient gives each rank exactly the partitions
    DeepSpeed's `reduce_scatter_coalesced` gives it (same values, same lengths), padding included: gradients
    whose length the world size does not divide, one shorter than the number of ranks (gloo processes)."""
    import torch.multiprocessing as mp

    mp.spawn(_reduce_scatter_worker, args=(world, str(tmp_path / "pg"), str(tmp_path)), nprocs=world)
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert [t.shape for t in got["ours"]] == [t.shape for t in got["theirs"]], rank
        assert all(torch.equal(a, b) for a, b in zip(got["ours"], got["theirs"], strict=True)), rank


class _Weights(torch.nn.Module):
    def __init__(self, tensors):
        super().__init__()
        for i, w in enumerate(tensors):
            self.register_parameter(f"p{i}", torch.nn.Parameter(w.clone(), requires_grad=i != 1))


def _release_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))  # read by zero.Init
    import deepspeed
    import deepspeed.comm as dist
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from distsft.zero3_host import _release

    dist.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, init_method=f"file://{init_file}",
                          rank=rank, world_size=world)
    torch.manual_seed(0)  # the same whole weights on every rank
    whole = [torch.randn(5, 7), torch.randn(3), torch.randn(4, 4)]  # 35 and 3 elements: padded shards
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    with deepspeed.zero.Init(config_dict_or_path=config):
        module = _Weights(whole)
    params = list(module.parameters())

    def shard(p):  # this rank's part of the weight (the padding after the last element is never written)
        return p.ds_tensor[:max(0, min(p.ds_tensor.numel(), p.ds_numel - rank * p.ds_tensor.numel()))].clone()

    shards = [shard(p) for p in params]
    results = {}
    for name in ("theirs", "ours"):
        params[0].all_gather_coalesced(params).wait()
        gathered = [p.data.clone() for p in params]
        if name == "ours":
            _release(params)
        else:
            params[0].partition(param_list=params)
        results[name] = {"gathered": gathered, "status": [p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in params],
                         "data": [(tuple(p.data.shape), p.data.dtype) for p in params],
                         "shards": [torch.equal(shard(p), s) for p, s in zip(params, shards, strict=True)]}
    params[0].all_gather_coalesced(params).wait()  # gathered again after ours: the same whole values
    results["again"] = [p.data.clone() for p in params]
    params[2].ds_active_sub_modules.add(123)  # still in use by a module: refused, as DeepSpeed refuses
    try:
        _release(params[2:])
        results["refused"] = False
    except RuntimeError:
        results["refused"] = True
    torch.save({"whole": whole, **results}, f"{out_dir}/release{rank}.pt")
    _leave(dist)


def test_layer_release_frees_what_deepspeeds_partition_frees(tmp_path):
    """`zero3_host._release` (the layer releases and the step's bulk release) leaves a gathered parameter as
    DeepSpeed's `partition` leaves it: NOT_AVAILABLE, an empty tensor of its dtype, its own shard untouched,
    and gathered again to the same whole values; one still marked in use by a module is refused (two gloo
    ranks, shards padded)."""
    import torch.multiprocessing as mp

    mp.spawn(_release_worker, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        got = torch.load(tmp_path / f"release{rank}.pt")
        for name in ("theirs", "ours"):
            r = got[name]
            assert all(torch.equal(a, b) for a, b in zip(r["gathered"], got["whole"], strict=True)), (rank, name)
            assert r["status"] == [True] * 3 and all(r["shards"]), (rank, name, r)
            assert r["data"] == [((0,), torch.float32)] * 3, (rank, name, r["data"])
        assert all(torch.equal(a, b) for a, b in zip(got["again"], got["whole"], strict=True)), rank
        assert got["refused"], rank


def _one_rank_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1")  # read by zero.Init
    import deepspeed
    import deepspeed.comm as dist

    from distsft.zero3_host import _views_of_partitions, _whole_at_one_rank

    dist.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, init_method=f"file://{init_file}",
                          rank=0, world_size=1)
    torch.manual_seed(0)
    whole = [torch.randn(5, 7), torch.randn(3), torch.randn(4, 4)]
    with deepspeed.zero.Init(config_dict_or_path={"train_micro_batch_size_per_gpu": 1,
                                                  "zero_optimization": {"stage": 3}}):
        module = _Weights(whole)
    params = list(module.parameters())
    params[0].all_gather_coalesced(params).wait()
    out = {"whole_at_one_rank": _whole_at_one_rank(params),
           "views": [p.data.data_ptr() == p.ds_tensor.data_ptr() for p in params]}
    params[0].ds_tensor.data = params[0].ds_tensor.data + 1  # DeepSpeed gave it another partition
    kept = params[1].data
    _views_of_partitions(params)
    out["moved"] = (params[0].data.data_ptr() == params[0].ds_tensor.data_ptr(),
                    torch.equal(params[0].data, whole[0] + 1), tuple(params[0].data.shape))
    out["untouched"] = params[1].data is kept or params[1].data.data_ptr() == kept.data_ptr()
    torch.save(out, f"{out_dir}/one_rank.pt")
    _leave(dist)


def test_one_rank_gather_is_a_view_and_a_moved_partition_is_followed(tmp_path):
    """What keeping parameters whole at one rank rests on (`_keeps_layers_whole`, `_one_rank_persistent`): a
    ZeRO-3 gather over one rank makes each parameter a view of its partition; where DeepSpeed gives a
    parameter another partition, `_views_of_partitions` (after every step) makes it a view of the new one,
    with its shape, and leaves the others as they are (one gloo process)."""
    import torch.multiprocessing as mp

    mp.spawn(_one_rank_worker, args=(1, str(tmp_path / "pg"), str(tmp_path)), nprocs=1)
    got = torch.load(tmp_path / "one_rank.pt")
    assert got["whole_at_one_rank"] and got["views"] == [True] * 3, got
    assert got["moved"] == (True, True, (5, 7)), got
    assert got["untouched"], got

"""precision.cache_weights: weights quantized once per optimizer step give the same outputs and gradients, bit for
bit, as quantizing them in every micro-batch's forward; the cache follows every in-place change of the weight."""
import pytest
import torch
from torch import nn

from lowbit.config import PrecisionConfig
from lowbit.precision import linear as linear_module
from lowbit.precision.linear import QuantLinear
from lowbit.precision.recipes import build_recipe
from lowbit.precision import weight_cache as weight_cache_module
from lowbit.precision.weight_cache import install

RECIPES = [dict(recipe="fp8_tensorwise"), dict(recipe="fp8_rowwise"),
           dict(recipe="fp4_vectorwise", dge=True, occ=True), dict(recipe="nvfp4"),
           dict(recipe="fp8_rowwise", high_precision=["wgrad"]), dict(recipe="fp4_vectorwise", asymmetric=True)]


def two_layers(options: dict) -> nn.Sequential:
    torch.manual_seed(0)
    recipe = build_recipe(PrecisionConfig(**options))
    return nn.Sequential(*(QuantLinear.from_linear(nn.Linear(64, 64), recipe, name=f"l{i}") for i in range(2)))


def micro_batches(model: nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    outputs = []
    for x in inputs:
        y = model(x)
        y.square().mean().backward()
        outputs.append(y.detach())
    return outputs


@pytest.mark.parametrize("options", RECIPES, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_cached_weights_equal_quantizing_every_micro_batch(options, monkeypatch):
    fresh, cached = two_layers(options), two_layers(options)
    assert install(cached) == 2
    calls = []
    quantize_weight = linear_module.quantize_weight
    counted = lambda *a: calls.append(1) or quantize_weight(*a)     # noqa: E731
    monkeypatch.setattr(linear_module, "quantize_weight", counted)
    monkeypatch.setattr(weight_cache_module, "quantize_weight", counted)
    generator = torch.Generator().manual_seed(1)
    for step in range(2):
        inputs = [torch.randn(16, 64, generator=generator) for _ in range(3)]
        calls.clear()
        want, got = micro_batches(fresh, inputs), micro_batches(cached, inputs)
        assert len(calls) == 3 * 2 + 2, calls          # uncached: every forward; cached: once per layer and step
        for a, b in zip(want, got):
            assert torch.equal(a, b), options
        for p, q in zip(fresh.parameters(), cached.parameters()):
            assert torch.equal(p.grad, q.grad), options
        for model in (fresh, cached):                  # an in-place update, as the optimizer's step makes
            with torch.no_grad():
                for p in model.parameters():
                    p.sub_(0.1 * p.grad)
                    p.grad = None


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_cache_follows_optimizer_steps_that_leave_the_version_counter(fused):
    """Fused AdamW (the trainer's default on CUDA) updates the weights in place without moving their version
    counters: the cache must still quantize the new weights (a version-only check kept the first step's weights
    for a whole H200 run). Three steps of two micro-batches, cached vs fresh, bit for bit."""
    fresh, cached = two_layers(dict(recipe="fp8_tensorwise")), two_layers(dict(recipe="fp8_tensorwise"))
    install(cached)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, fused=fused or None, foreach=None if fused else True)
                  for m in (fresh, cached)]
    generator = torch.Generator().manual_seed(2)
    for step in range(3):
        inputs = [torch.randn(16, 64, generator=generator) for _ in range(2)]
        for a, b in zip(micro_batches(fresh, inputs), micro_batches(cached, inputs)):
            assert torch.equal(a, b), (step, fused)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA GPU with FP8")
@pytest.mark.parametrize("options", RECIPES, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_refresh_by_cuda_graph_equals_eager_refresh(options, monkeypatch):
    """On CUDA the refresh of all layers is one captured CUDA graph, replayed after each optimizer step: three fused
    AdamW steps of two micro-batches give the same outputs, gradients and cached operands, bit for bit, as the eager
    refresh (LOWBIT_WEIGHT_CACHE_GRAPH=0) and as quantizing in every forward."""
    from lowbit.precision.weight_cache import CacheRefresher

    models = {"fresh": two_layers(options).cuda()}
    for name, graph in (("eager", "0"), ("graph", "1")):
        monkeypatch.setenv("LOWBIT_WEIGHT_CACHE_GRAPH", graph)
        models[name] = two_layers(options).cuda()
        install(models[name])
    refresher = next(h for h in models["graph"]._forward_pre_hooks.values() if isinstance(h, CacheRefresher))
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True) for name, m in models.items()}
    generator = torch.Generator(device="cuda").manual_seed(3)
    for step in range(3):
        inputs = [torch.randn(16, 64, device="cuda", generator=generator) for _ in range(2)]
        outputs = {name: micro_batches(m, inputs) for name, m in models.items()}
        for name in ("eager", "graph"):
            for a, b in zip(outputs["fresh"], outputs[name]):
                assert torch.equal(a, b), (step, name, options)
            for p, q in zip(models["fresh"].parameters(), models[name].parameters()):
                assert torch.equal(p.grad, q.grad), (step, name, options)
        for a, b in zip(models["eager"], models["graph"]):
            for kept, got in zip(a.weight_cache.pairs, b.weight_cache.pairs):
                for x, y in zip(kept, got):
                    assert (x is None) == (y is None) and (x is None or torch.equal(x.data, y.data)), (step, options)
        for optimizer in optimizers.values():
            optimizer.step()
            optimizer.zero_grad()
    assert refresher.graph is not None          # steps 2 and 3 replayed the graph


def test_cache_follows_load_state_dict_and_leaves_unchanged_weights_alone():
    model = two_layers(dict(recipe="fp8_tensorwise"))
    install(model)
    x = torch.randn(8, 64)
    model(x)
    first = model[0].weight_cache.pairs[0][0].data.clone()
    key = model[0].weight_cache.key
    model(x)
    assert model[0].weight_cache.key == key            # nothing changed: nothing quantized again
    state = {k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(state)                        # copies into the same storage: the version moves
    y = model(x)
    assert model[0].weight_cache.key != key and not torch.equal(model[0].weight_cache.pairs[0][0].data, first)
    plain = two_layers(dict(recipe="fp8_tensorwise"))
    plain.load_state_dict(state)
    assert torch.equal(y, plain(x))


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_trainer_with_cached_weights_gives_the_same_losses(tiny_overrides, tmp_path, compiled):
    """The real trainer, 2 micro-batches per step, 3 steps: the same losses with and without the cache, also when
    Inductor compiles the decoder layers (the cache is refreshed outside them, in place)."""
    import json

    from lowbit.train.run import run
    from tests.conftest import compose

    def losses(cache: bool) -> list[float]:
        run_dir = tmp_path / f"cache_{cache}"
        run(compose(tiny_overrides + ["precision=fp8_tensorwise", f"precision.cache_weights={str(cache).lower()}",
                                      f"model.compile={str(compiled).lower()}", "trainer.max_steps=3",
                                      "trainer.save_every=-1", "trainer.eval_every=-1", "trainer.eval_at_start=false",
                                      "trainer.export=false", f"run_dir={run_dir}"]))
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    fresh, cached = losses(False), losses(True)
    assert len(fresh) == 3 and fresh == cached, (fresh, cached)


def test_cache_with_sharded_weights_is_switched_off_by_name(caplog):
    from lowbit.config import ParallelConfig
    from lowbit.precision.weight_cache import check_parallel

    cfg = PrecisionConfig(cache_weights=True)
    check_parallel(cfg, ParallelConfig())                   # one process / DDP: kept
    assert cfg.cache_weights
    for parallel, key in ((ParallelConfig(tp=2), "parallel.tp"), (ParallelConfig(dp_shard=2), "parallel.dp_shard"),
                          (ParallelConfig(data_parallel="deepspeed", zero_stage=3), "parallel.zero_stage")):
        cfg = PrecisionConfig(cache_weights=True)
        caplog.clear()
        with caplog.at_level("WARNING", logger="lowbit"):
            check_parallel(cfg, parallel)
        assert not cfg.cache_weights
        assert f"precision.cache_weights=true is switched off: {key} shard the weights" in caplog.text


def test_a_bad_graph_switch_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("LOWBIT_WEIGHT_CACHE_GRAPH", "false")
    with pytest.raises(ValueError, match=r"LOWBIT_WEIGHT_CACHE_GRAPH='false': set 1 .* or 0"):
        install(two_layers(dict(recipe="fp8_tensorwise")))

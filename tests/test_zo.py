"""The zero-order engine: seeds and z, exact perturbation, the estimator, optimisers and their state."""

import dataclasses
import math
import threading

import pytest
import torch
from conftest import small_config
from torch import nn

from hf_zoo_rnn import ZooRnnForCausalLM, modeling_zoo_rnn
from hf_zoo_rnn.estimators.probes import population_loss
from hf_zoo_rnn.forwards.population import members_loss
from hf_zoo_rnn.zo import Perturber, ZOConfig, ZOOptimizer, noise, stream_seed, zo_parameters
from hf_zoo_rnn.zo.directions import GuidedDirections, IsotropicDirections, LowRankDirections
from hf_zoo_rnn.zo.estimator import probe_coefficients, projected_gradients, reported_loss, shaped_losses
from hf_zoo_rnn.zo.noise import splitmix64
from hf_zoo_rnn.zo.optimizer import probes_per_forward


def tiny_lm(dtype=torch.float32, seed=0, **overrides):
    """The same small LSTM LM on every call (for a given seed)."""
    torch.manual_seed(seed)
    config = small_config(vocab_size=12, embedding_size=8, num_heads=2, head_dim=8, **overrides)
    return ZooRnnForCausalLM(config).to(dtype).eval().requires_grad_(False)


def lm_loss(model, ids):
    return lambda: model(ids, labels=ids, logits_to_keep=1).loss


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def bitwise_equal(a, b):
    return all(
        x.dtype == y.dtype and torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(a, b, strict=True)
    )


# -- seeds and z ------------------------------------------------------------------------------------------------------


def test_noise_matches_a_pure_python_splitmix64():
    stream = stream_seed(run_seed=7, step=3, probe=5, tensor_index=2)
    z = noise(stream, start=100, length=50)
    for j in range(100, 150):
        bits = splitmix64(stream + (j + 1) * 0x9E3779B97F4A7C15)
        assert z[j - 100].item() == (-1.0 if bits >> 63 else 1.0)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_chunked_generation_equals_whole_tensor_generation(distribution):
    stream = stream_seed(0, 1, 2, 3)
    whole = noise(stream, 0, 1000, distribution)
    pieces = torch.cat([noise(stream, start, min(137, 1000 - start), distribution) for start in range(0, 1000, 137)])
    assert torch.equal(whole, pieces)


def test_distributions_have_the_right_moments():
    rademacher = noise(stream_seed(0, 0, 0, 0), 0, 200_000)
    assert set(rademacher.unique().tolist()) == {-1.0, 1.0}
    assert abs(rademacher.mean().item()) < 0.01
    gaussian = noise(stream_seed(0, 0, 0, 0), 0, 200_000, "gaussian")
    assert abs(gaussian.mean().item()) < 0.01 and abs(gaussian.std().item() - 1) < 0.01
    assert abs(((gaussian**4).mean() - 3).item()) < 0.1  # kurtosis of a normal, not of a uniform


def test_seeds_are_distinct_across_steps_probes_and_tensors():
    seeds = {stream_seed(11, step, probe, tensor) for step in range(40) for probe in range(40) for tensor in range(12)}
    assert len(seeds) == 40 * 40 * 12
    assert stream_seed(11, 0, 0, 0) != stream_seed(12, 0, 0, 0)
    # neighbouring triples give unrelated directions
    a, b = noise(stream_seed(1, 0, 0, 0), 0, 10_000), noise(stream_seed(1, 0, 1, 0), 0, 10_000)
    assert abs((a * b).mean().item()) < 0.05


def test_seed_scheme_refuses_counters_it_cannot_pack():
    with pytest.raises(ValueError, match="probe index 1048576 is outside"):
        stream_seed(0, 0, 1 << 20, 0)
    with pytest.raises(ValueError, match="tensor index 4096 is outside"):
        stream_seed(0, 0, 0, 1 << 12)


# -- perturbation -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturb_and_restore_is_bitwise_exact(dtype):
    model = tiny_lm(dtype)
    before = snapshot(model)
    params = [p for _, p in zo_parameters(model)]
    perturber = Perturber(params, IsotropicDirections(params, 0, "gaussian"), max_chunk_elements=50)
    perturber.snapshot()
    for probe in range(5):
        perturber.perturb(probe, 0.01)
        assert not bitwise_equal(snapshot(model), before)
        perturber.perturb(probe, -0.01)
        perturber.restore()
    assert bitwise_equal(snapshot(model), before)


def test_the_papers_in_place_chain_drifts_in_bf16():
    """Why the backup exists: +eps, -2eps, +eps in place does not return to theta in low precision."""
    theta = torch.randn(10_000).to(torch.bfloat16)
    z = noise(stream_seed(0, 0, 0, 0), 0, 10_000).to(torch.bfloat16)
    chained = theta.clone()
    chained += 0.01 * z
    chained -= 0.02 * z
    chained += 0.01 * z
    assert not torch.equal(chained, theta)


def test_tied_parameters_are_perturbed_once():
    model = ZooRnnForCausalLM(small_config(embedding_size=24, tie_word_embeddings=True, residual=True))
    names = [name for name, _ in zo_parameters(model)]
    assert "model.embeddings.weight" in names and "lm_head.weight" not in names
    assert len(names) == len({id(p) for p in model.parameters()})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lr_zero_leaves_parameters_bitwise_unchanged(dtype):
    model = tiny_lm(dtype)
    ids = torch.randint(0, 12, (4, 10))
    before = snapshot(model)
    optimizer = ZOOptimizer(model, ZOConfig(num_probes=6, eps=0.05, lr=0.0))
    for _ in range(3):
        stats = optimizer.step(lm_loss(model, ids))
    assert stats.forward_passes == 12 and stats.update_norm == 0.0
    assert bitwise_equal(snapshot(model), before)


def test_chunk_size_does_not_change_the_step():
    ids = torch.randint(0, 12, (4, 10))
    results = []
    for chunk in (13, 1 << 24):
        model = tiny_lm()
        optimizer = ZOOptimizer(model, ZOConfig(num_probes=4, lr=0.1, max_chunk_elements=chunk))
        optimizer.step(lm_loss(model, ids))
        results.append(snapshot(model))
    assert bitwise_equal(*results)


# -- estimator --------------------------------------------------------------------------------------------------------


def test_projected_gradients_and_coefficients():
    plus, minus = torch.tensor([3.0, 1.0, float("nan")]), torch.tensor([1.0, 2.0, 0.0])
    assert torch.allclose(
        projected_gradients(plus, minus, 0.5, "central"), torch.tensor([2.0, -1.0, float("nan")]), equal_nan=True
    )
    assert torch.allclose(
        projected_gradients(plus, minus, 0.5, "forward"), torch.tensor([4.0, -2.0, float("nan")]), equal_nan=True
    )
    coefficients, kept = probe_coefficients(plus, minus, 0.5, "central", clip=1.5)
    assert kept == 2 and coefficients.tolist() == [1.5, -1.0, 0.0]
    assert reported_loss(plus, minus, "central") == pytest.approx(1.75)


class Quadratic(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
        self.register_buffer("A", a @ a.T / dim + torch.eye(dim, dtype=torch.float64))
        self.register_buffer("b", torch.randn(dim, generator=generator, dtype=torch.float64))
        self.theta = nn.Parameter(torch.randn(dim, generator=generator, dtype=torch.float64), requires_grad=False)

    def forward(self):
        return 0.5 * self.theta @ self.A @ self.theta + self.b @ self.theta

    def gradient(self):
        return self.A @ self.theta + self.b


def zo_gradient_estimate(model, loss_fn, **config) -> torch.Tensor:
    """g_hat read off one plain SGD step with lr = 1: theta_before - theta_after."""
    before = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    ZOOptimizer(model, ZOConfig(lr=1.0, **config)).step(loss_fn)
    after = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    return before - after


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_estimate_is_unbiased_on_a_quadratic(distribution):
    model = Quadratic()
    true_gradient = model.gradient().detach().clone()
    estimates = []
    for seed in range(64):
        fresh = Quadratic()
        estimates.append(
            zo_gradient_estimate(fresh, fresh, num_probes=64, eps=1e-3, seed=seed, distribution=distribution)
        )
    mean = torch.stack(estimates).mean(0)
    assert (mean - true_gradient).norm() / true_gradient.norm() < 0.05
    # a single small-K estimate is far noisier than the mean: the test is about bias, not luck
    assert (estimates[0] - true_gradient).norm() > 2 * (mean - true_gradient).norm()


def test_estimate_aligns_with_autograd_as_probes_grow():
    ids = torch.randint(0, 12, (8, 12))
    model = tiny_lm(torch.float64)
    model.requires_grad_(True)
    loss = model(ids, labels=ids).loss
    true_gradient = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])
    model.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cosines = {}
    for probes in (8, 64, 512):
        model.load_state_dict(state)
        estimate = zo_gradient_estimate(model, lm_loss(model, ids), num_probes=probes, eps=1e-4)
        cosines[probes] = torch.nn.functional.cosine_similarity(estimate, true_gradient, dim=0).item()
    dim = true_gradient.numel()
    # E[cos] ~ sqrt(K / (K + d)) for Rademacher probes on a smooth loss
    for probes, cosine in cosines.items():
        assert 0.5 * math.sqrt(probes / (probes + dim)) < cosine < 2 * math.sqrt(probes / (probes + dim))
    assert cosines[8] < cosines[64] < cosines[512]


def test_tied_mode_is_the_papers_update():
    """theta <- theta - (1/n) sum_i ((L+_i - L-_i) / 2) z_i, with no division by eps."""
    ids = torch.randint(0, 12, (4, 10))
    model = tiny_lm(torch.float64)
    params = [p for _, p in zo_parameters(model)]
    theta = [p.detach().clone() for p in params]
    eps, probes, seed = 0.05, 3, 9
    expected = [t.clone() for t in theta]
    for probe in range(probes):
        zs = [noise(stream_seed(seed, 0, probe, i), 0, p.numel()).double().view_as(p) for i, p in enumerate(params)]
        losses = []
        for sign in (1, -1):
            for p, t, z in zip(params, theta, zs, strict=True):
                p.copy_(t + sign * eps * z)
            losses.append(lm_loss(model, ids)().item())
        for e, z in zip(expected, zs, strict=True):
            e -= (losses[0] - losses[1]) / 2 * z / probes
    for p, t in zip(params, theta, strict=True):
        p.copy_(t)
    ZOOptimizer(model, ZOConfig(num_probes=probes, eps=eps, tied=True, seed=seed)).step(lm_loss(model, ids))
    for p, e in zip(params, expected, strict=True):
        assert (p - e).abs().max() < 1e-12


# -- robustness -------------------------------------------------------------------------------------------------------


def test_nan_probes_are_dropped_and_all_nan_skips_the_step():
    ids = torch.randint(0, 12, (4, 10))
    model = tiny_lm()
    calls = {"n": 0}

    def loss_with_a_bad_probe():
        calls["n"] += 1
        loss = lm_loss(model, ids)()
        return torch.tensor(float("nan")) if calls["n"] == 3 else loss  # probe 1, plus side

    before = snapshot(model)
    stats = ZOOptimizer(model, ZOConfig(num_probes=4, lr=0.1)).step(loss_with_a_bad_probe)
    assert stats.dropped_probes == 1 and not stats.skipped and math.isfinite(stats.loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not bitwise_equal(snapshot(model), before)

    before = snapshot(model)
    stats = ZOOptimizer(model, ZOConfig(num_probes=4, lr=0.1)).step(lambda: torch.tensor(float("inf")))
    assert stats.skipped and stats.dropped_probes == 4
    assert bitwise_equal(snapshot(model), before)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam", "adam-lowrank"])
def test_state_dict_round_trip_continues_identically(optimizer):
    ids = torch.randint(0, 12, (4, 10))
    rule, _, perturbation = optimizer.partition("-")
    config = ZOConfig(
        num_probes=4,
        lr=0.05,
        update_rule=rule,
        weight_decay=0.01,
        lr_schedule="cosine",
        total_steps=10,
        perturbation=perturbation or "full",
    )
    model = tiny_lm()
    zo = ZOOptimizer(model, config)
    for _ in range(3):
        zo.step(lm_loss(model, ids))
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_zo = zo.state_dict()
    for _ in range(2):
        zo.step(lm_loss(model, ids))
    uninterrupted = snapshot(model)

    resumed = tiny_lm()
    resumed.load_state_dict(saved_model)
    resumed_zo = ZOOptimizer(resumed, config)
    resumed_zo.load_state_dict(saved_zo)
    for _ in range(2):
        resumed_zo.step(lm_loss(resumed, ids))
    assert bitwise_equal(snapshot(resumed), uninterrupted)


def test_momentum_and_adam_really_change_the_update():
    ids = torch.randint(0, 12, (4, 10))
    finals = {}
    for optimizer in ("sgd", "momentum", "adam"):
        model = tiny_lm()
        zo = ZOOptimizer(model, ZOConfig(num_probes=4, lr=0.01, update_rule=optimizer))
        for _ in range(3):
            zo.step(lm_loss(model, ids))
        finals[optimizer] = snapshot(model)
    assert not bitwise_equal(finals["sgd"], finals["momentum"])
    assert not bitwise_equal(finals["sgd"], finals["adam"])


def test_schedules_move_lr_and_eps():
    config = ZOConfig(lr=1.0, eps=0.1, lr_schedule="linear", eps_schedule="cosine", warmup_steps=2, total_steps=10)
    zo = ZOOptimizer(tiny_lm(), config)
    assert zo.current_lr() == 0.0 and zo.current_eps() == pytest.approx(0.1)  # warm-up is for lr only
    zo.step_count = 2
    assert zo.current_lr() == pytest.approx(1.0)
    zo.step_count = 5
    assert zo.current_eps() == pytest.approx(0.05)
    zo.step_count = 6
    assert zo.current_lr() == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"lr": 0.1, "tied": True}, "lr must be unset when tied=True"),
        ({"lr": 0.1, "update_rule": "lion"}, "update_rule must be one of"),
        ({"lr": 0.1, "eps": 0}, "eps must be positive"),
        ({"lr": 0.1, "eps_schedule": "constant_with_warmup"}, "eps_schedule must be one of"),
    ],
)
def test_invalid_zo_config_is_rejected_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ZOConfig(**kwargs)


# -- update modes and distribution --------------------------------------------------------------------------------


def test_buffer_mode_equals_replay_mode_in_one_process():
    ids = torch.randint(0, 12, (4, 10))
    finals = []
    for mode in ("replay", "buffer"):
        model = tiny_lm()
        zo = ZOOptimizer(model, ZOConfig(num_probes=5, lr=0.1, update_mode=mode))
        for _ in range(2):
            zo.step(lm_loss(model, ids))
        finals.append(snapshot(model))
    assert bitwise_equal(*finals)


def run_ranks(world_size, probes, mode, ids, steps=2, **options):
    """world_size threads, each a replica with its own optimizer, exchanging only loss scalars."""
    barrier = threading.Barrier(world_size)
    slots: list = [None] * world_size
    models = [tiny_lm() for _ in range(world_size)]

    def gather_for(rank):
        def gather(local):
            slots[rank] = local
            barrier.wait()
            gathered = torch.cat(slots)
            barrier.wait()
            return gathered

        return gather

    def worker(rank):
        zo = ZOOptimizer(models[rank], ZOConfig(num_probes=probes, lr=0.1, update_mode=mode, **options))
        members = None
        if zo.config.probes_per_forward != 1:  # low-rank probes as one batch, each process its share
            members = population_loss(models[rank], zo.names, ids, ids, members=True)
        for _ in range(steps):
            loss = lm_loss(models[rank], ids)
            zo.step(loss, rank=rank, world_size=world_size, gather=gather_for(rank), population_loss=members)

    threads = [threading.Thread(target=worker, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [snapshot(model) for model in models]


PROBE_KINDS = {
    "full": {},
    "lowrank": {"perturbation": "lowrank"},
    "lowrank_batched": {"perturbation": "lowrank", "probes_per_forward": 0},
}


@pytest.mark.parametrize("kind", PROBE_KINDS)
@pytest.mark.parametrize("mode", ["replay", "buffer"])
def test_split_probes_give_identical_replicas_and_match_one_process(mode, kind):
    ids = torch.randint(0, 12, (4, 10))
    torch.set_num_threads(1)  # the same arithmetic in every replica's forward
    try:
        (single,) = run_ranks(1, 8, mode, ids, **PROBE_KINDS[kind])
        first, second = run_ranks(2, 8, mode, ids, **PROBE_KINDS[kind])
    finally:
        torch.set_num_threads(2)
    assert bitwise_equal(first, second)  # every rank holds the same weights
    if mode == "replay":
        assert bitwise_equal(first, single)  # same sums in the same order: bitwise
    else:
        # buffer mode sums per-rank partials, a different fp32 association than one process
        assert all((a - b).abs().max() < 1e-6 for a, b in zip(first, single, strict=True))


def test_incomplete_config_is_rejected_when_the_optimizer_is_built():
    with pytest.raises(ValueError, match="lr is required unless tied=True"):
        ZOOptimizer(tiny_lm(), ZOConfig())
    with pytest.raises(ValueError, match=r"total_steps is required by the \['cosine'\] schedule"):
        ZOOptimizer(tiny_lm(), ZOConfig(lr=0.1, eps_schedule="cosine"))


def test_probes_must_divide_over_processes():
    model = tiny_lm()
    with pytest.raises(ValueError, match="num_probes=5 is not divisible by the 2 processes"):
        ZOOptimizer(model, ZOConfig(num_probes=5, lr=0.1)).step(lambda: torch.tensor(0.0), rank=0, world_size=2)


def test_lstm_lm_overfits_one_batch_with_zo_alone():
    """The paper's overfitting setting scaled to CPU: one fixed batch, forward passes only, loss below 0.1."""
    config = small_config(vocab_size=12, embedding_size=16, num_heads=2, head_dim=16, chunk_size=16)
    model = ZooRnnForCausalLM(config).eval().requires_grad_(False)
    ids = torch.randint(0, 12, (4, 10))
    loss_fn = lm_loss(model, ids)
    start = loss_fn().item()
    zo = ZOOptimizer(model, ZOConfig(num_probes=16, lr=0.05, eps=0.01, update_rule="adam"))
    for _ in range(400):
        zo.step(loss_fn)
        if loss_fn().item() < 0.1:
            break
    assert start > 2.0
    assert loss_fn().item() < 0.1


# -- probe stacking ---------------------------------------------------------------------------------------------------


def stacked_loss_for(model, ids):
    return population_loss(model, [name for name, _ in zo_parameters(model)], ids, ids, members=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stacked_points_are_the_sequential_points_bit_for_bit(dtype):
    model = tiny_lm(dtype)
    params = [p for _, p in zo_parameters(model)]
    perturber = Perturber(params, IsotropicDirections(params, 3, "rademacher"), max_chunk_elements=50)
    probes = (4, 9)
    points, z_cache = perturber.stacked(probes, (0.01, -0.01), keep_z=True)
    before = snapshot(model)
    perturber.snapshot()
    for j, probe in enumerate(probes):
        cached = [z.view_as(p) for z, p in zip(z_cache[j], params, strict=True)]
        regenerated = [perturber.z(probe, i, 0, p.numel()).view_as(p) for i, p in enumerate(params)]
        assert bitwise_equal(cached, regenerated)
        for k, scale in enumerate((0.01, -0.01)):
            perturber.perturb(probe, scale)
            assert bitwise_equal(snapshot(model), [stack[2 * j + k] for stack in points])
    perturber.restore()
    assert bitwise_equal(snapshot(model), before)  # stacking never moved theta


@pytest.mark.parametrize("mode", ["replay", "buffer"])
@pytest.mark.parametrize("difference", ["central", "forward"])
def test_stacked_probes_give_the_sequential_step(mode, difference):
    ids = torch.randint(0, 12, (4, 10))
    runs = {}
    for per_forward in (1, 3, 0):  # one at a time; groups of 3 (the last group holds 2); automatic
        model = tiny_lm(torch.float64)
        config = ZOConfig(num_probes=8, lr=0.1, update_mode=mode, difference=difference, probes_per_forward=per_forward)
        zo = ZOOptimizer(model, config)
        losses = [zo.step(lm_loss(model, ids), population_loss=stacked_loss_for(model, ids)).loss for _ in range(2)]
        runs[per_forward] = losses, snapshot(model)
    reference_losses, reference_weights = runs[1]
    for losses, weights in (runs[3], runs[0]):
        assert losses == pytest.approx(reference_losses, abs=1e-12)
        assert all((a - b).abs().max() < 1e-12 for a, b in zip(weights, reference_weights, strict=True))
    assert not bitwise_equal(reference_weights, snapshot(tiny_lm(torch.float64)))  # the steps did move theta


def test_probes_per_forward_follows_the_memory_budget():
    assert probes_per_forward(4, probes=16, models_per_probe=2, bytes_per_model=100, budget_mb=1) == 4
    assert probes_per_forward(64, probes=16, models_per_probe=2, bytes_per_model=100, budget_mb=1) == 16
    mib = 2**20
    assert probes_per_forward(0, probes=16, models_per_probe=2, bytes_per_model=mib, budget_mb=10) == 5
    assert probes_per_forward(0, probes=16, models_per_probe=2, bytes_per_model=mib, budget_mb=1) == 1  # never 0


def test_stacking_without_a_population_loss_is_rejected():
    model = tiny_lm()
    zo = ZOOptimizer(model, ZOConfig(num_probes=4, lr=0.1, probes_per_forward=2))
    with pytest.raises(ValueError, match="probes_per_forward=2 needs a population_loss"):
        zo.step(lm_loss(model, torch.randint(0, 12, (2, 5))))
    with pytest.raises(ValueError, match="probes_per_forward must be >= 0"):
        ZOConfig(lr=0.1, probes_per_forward=-1)


# -- guided directions, parameter subsets, a given clean loss ----------------------------------------------------------


def test_guided_directions_have_the_isotropic_trace_and_tilt_towards_the_surrogates():
    params = [torch.zeros(30), torch.zeros(5, 4)]
    surrogate = [torch.randn(30), torch.randn(5, 4)]
    guided = GuidedDirections(params, seed=3, distribution="gaussian", alpha=0.25)
    guided.set_subspace([surrogate, [2 * s for s in surrogate]])  # the second adds nothing new: dropped
    assert guided.basis[0].shape == (1, 30)
    u = torch.cat([b.reshape(-1) for b in guided.basis])
    assert u.norm().item() == pytest.approx(1.0, abs=1e-6)
    samples = torch.stack(
        [torch.cat([guided.z(probe, i, 0, p.numel()) for i, p in enumerate(params)]) for probe in range(4000)]
    )
    n = samples.shape[1]
    # E[z z^T] = alpha I + (1 - alpha) n/k u u^T: total variance n, and (1 - alpha) n + alpha along u
    assert samples.pow(2).sum(1).mean().item() == pytest.approx(n, rel=0.05)
    assert (samples @ u).pow(2).mean().item() == pytest.approx(0.75 * n + 0.25, rel=0.1)
    # pieces and whole tensors agree, and the same (step, probe) always gives the same z
    whole = guided.z(7, 0, 0, 30)
    assert torch.equal(torch.cat([guided.z(7, 0, 0, 13), guided.z(7, 0, 13, 17)]), whole)
    guided.set_subspace([])
    assert torch.equal(guided.z(7, 0, 0, 30), IsotropicDirections(params, 3, "gaussian").z(7, 0, 0, 30))


def test_guided_estimate_follows_a_good_surrogate_and_stays_a_descent_direction():
    torch.manual_seed(0)
    d, target = 2000, torch.randn(2000, dtype=torch.float64)
    weights = nn.Parameter(torch.zeros(d, dtype=torch.float64), requires_grad=False)
    holder = nn.Module()
    holder.w = weights

    def loss():
        return 0.5 * (weights - target).pow(2).sum()

    gradient = -target  # at w = 0
    surrogate = [(gradient + 0.5 * gradient.norm() / d**0.5 * torch.randn(d, dtype=torch.float64)).float()]
    cosines = {}
    for guide in ("none", "local"):
        zo = ZOOptimizer(holder, ZOConfig(num_probes=8, eps=1e-3, lr=1.0, guide=guide, seed=1))
        zo.step(loss, surrogates=[surrogate] if guide == "local" else ())
        step = -weights.detach().clone()
        with torch.no_grad():
            weights.zero_()
        cosines[guide] = float(step @ gradient / (step.norm() * gradient.norm()))
    assert cosines["local"] > 0.8 > 0.2 > cosines["none"] > 0  # isotropic: about sqrt(8 / 2000)


def test_update_history_guides_later_steps_and_resumes_bitwise():
    ids = torch.randint(0, 12, (2, 9))
    config = ZOConfig(num_probes=4, lr=1e-2, guide="updates", guide_history=2, update_rule="momentum")
    model = tiny_lm()
    zo = ZOOptimizer(model, config)
    for _ in range(3):
        zo.step(lm_loss(model, ids))
    assert all(h.abs().sum() > 0 for h in zo.buffers["update_history"])
    state, weights = zo.state_dict(), snapshot(model)
    zo.step(lm_loss(model, ids))
    expected = snapshot(model)

    resumed_model = tiny_lm()
    with torch.no_grad():
        for param, value in zip(resumed_model.parameters(), weights, strict=True):
            param.copy_(value)
    resumed = ZOOptimizer(resumed_model, config)
    resumed.load_state_dict(state)
    resumed.step(lm_loss(resumed_model, ids))
    assert bitwise_equal(snapshot(resumed_model), expected)
    with pytest.raises(ValueError, match="update_rule or guide changed"):
        ZOOptimizer(tiny_lm(), dataclasses.replace(config, guide="none")).load_state_dict(state)


def test_a_parameter_subset_moves_alone_and_a_given_clean_loss_saves_the_base_forward():
    ids = torch.randint(0, 12, (2, 9))
    names = ["model.layers.0.bias", "lm_head.bias"]
    results = {}
    for given in (False, True):
        model = tiny_lm(torch.float64)
        before = dict(model.named_parameters())
        before = {name: value.detach().clone() for name, value in before.items()}
        zo = ZOOptimizer(model, ZOConfig(num_probes=4, lr=1e-2, difference="forward"), names)
        clean = lm_loss(model, ids)().item() if given else None
        stats = zo.step(lm_loss(model, ids), clean_loss=clean)
        assert stats.forward_passes == 4 + (0 if given else 1)
        after = dict(model.named_parameters())
        assert {n for n in before if not torch.equal(before[n], after[n])} == set(names)
        results[given] = snapshot(model)
    assert bitwise_equal(results[False], results[True])  # the given clean loss is the one it would compute
    with pytest.raises(ValueError, match="not parameters of the model"):
        ZOOptimizer(tiny_lm(), ZOConfig(lr=1e-2), ["lm_head.gate"])
    with pytest.raises(ValueError, match="surrogates passed to step"):
        ZOOptimizer(tiny_lm(), ZOConfig(lr=1e-2, guide="local")).step(lm_loss(tiny_lm(), ids))


# -- low-rank directions (EGGROLL) ------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 3])
def test_low_rank_z_is_a_b_transposed_over_root_r_per_matrix_and_pieces_equal_the_whole(rank):
    params = [torch.zeros(5, 7), torch.zeros(3, 2, 4, 4), torch.zeros(6)]  # a matrix, a recurrent kernel, a bias
    directions = LowRankDirections(params, seed=3, distribution="rademacher", rank=rank, matrices=[True, True, False])
    directions.step = 2
    a, b = directions.factors(probe=1, index=0, batch=0)
    assert a.shape == (5, rank) and b.shape == (7, rank) and set(a.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(directions.z(1, 0, 0, 35), (a @ b.T / math.sqrt(rank)).reshape(-1))
    blocks = [directions.factors(1, 1, batch) for batch in range(6)]  # one D x D block per gate and head
    expected = torch.stack([a @ b.T for a, b in blocks]).reshape(-1) / math.sqrt(rank)
    torch.testing.assert_close(directions.z(1, 1, 0, 96), expected)
    pieces = torch.cat([directions.z(1, 1, start, min(11, 96 - start)) for start in range(0, 96, 11)])
    assert torch.equal(pieces, directions.z(1, 1, 0, 96))  # z does not depend on the chunking
    isotropic = IsotropicDirections(params, seed=3, distribution="rademacher")
    isotropic.step = 2
    assert torch.equal(directions.z(1, 2, 0, 6), isotropic.z(1, 2, 0, 6))  # vectors keep full-rank noise
    assert not torch.equal(directions.z(1, 0, 0, 35), directions.z(2, 0, 0, 35))
    every_a, every_b = directions.all_factors(1, 1)  # all of a tensor's matrices in one draw: the same factors
    assert all(torch.equal(every_a[i], blocks[i][0]) and torch.equal(every_b[i], blocks[i][1]) for i in range(6))


def test_low_rank_z_has_identity_covariance_and_its_update_is_one_product():
    params = [torch.zeros(4, 6)]
    directions = LowRankDirections(params, seed=0, distribution="rademacher", rank=2, matrices=[True])
    z = torch.stack([directions.z(probe, 0, 0, 24) for probe in range(4000)])
    covariance = z.T @ z / len(z)
    assert (covariance - torch.eye(24)).abs().max() < 0.1  # E[z z^T] = I, as for isotropic probes (4000 samples)
    coefficients = [0.5, -2.0, 0.0, 1.25]
    combined = torch.zeros(24)
    directions.add_combination(combined, range(4), coefficients, 0, 0, 24)
    expected = sum(c * directions.z(probe, 0, 0, 24) for probe, c in enumerate(coefficients))
    torch.testing.assert_close(combined, expected)
    piece = torch.zeros(9)
    directions.add_combination(piece, range(4), coefficients, 0, 7, 9)  # rows 1-2 of the matrix, partly
    torch.testing.assert_close(piece, expected[7:16])


def test_low_rank_probes_learn_and_refuse_what_they_cannot_combine():
    ids = torch.randint(0, 12, (4, 10))
    model = tiny_lm()
    options = {"perturbation": "lowrank", "perturbation_rank": 2, "update_rule": "adam"}
    zo = ZOOptimizer(model, ZOConfig(num_probes=16, lr=0.05, **options))
    first = lm_loss(model, ids)().item()
    for _ in range(60):
        zo.step(lm_loss(model, ids))
    assert lm_loss(model, ids)().item() < first - 0.5
    with pytest.raises(ValueError, match="lowrank perturbations need .* isotropic probes"):
        ZOConfig(lr=0.1, perturbation="lowrank", guide="updates")


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({}, id="lstm"),
        pytest.param({"cell": "gru", "num_hidden_layers": 2, "layer_norm": True, "output_bias": True}, id="gru-2-norm"),
        pytest.param({"num_hidden_layers": 2, "residual": True, "tie_word_embeddings": True}, id="lstm-2-tied"),
    ],
)
@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("cpu_path", ["dense", "loop"])
def test_low_rank_members_in_one_batch_give_each_perturbed_models_loss(overrides, rank, cpu_path, monkeypatch):
    if cpu_path == "loop":  # the head-major recurrence that layers wider than DENSE_MAX_HIDDEN run
        monkeypatch.setattr(modeling_zoo_rnn, "DENSE_MAX_HIDDEN", 0)
    config = small_config(vocab_size=12, embedding_size=16, num_heads=2, head_dim=8, **overrides)
    model = ZooRnnForCausalLM(config).double().eval().requires_grad_(False)
    ids = torch.randint(0, 12, (3, 11))  # chunk_size 5: the state crosses chunks
    zo = ZOOptimizer(model, ZOConfig(num_probes=4, lr=0.1, perturbation="lowrank", perturbation_rank=rank))
    # one model at a time, z = A B^T / sqrt(r) is formed in fp32 (as for every dtype); rank 1 has no rounding there
    tolerance = 1e-10 if rank == 1 else 1e-8
    zo.directions.step = 5
    scales = (0.05, -0.05)
    changes = zo.perturber.members(range(4), scales)
    batched = members_loss(model, dict(zip(zo.names, changes, strict=True)), ids, ids)
    zo.perturber.snapshot()
    for probe in range(4):
        for k, scale in enumerate(scales):
            zo.perturber.perturb(probe, scale)
            alone = model(ids, labels=ids).loss
            zo.perturber.restore()
            torch.testing.assert_close(batched[probe * 2 + k], alone, rtol=tolerance, atol=tolerance)
    assert batched.unique().numel() == 8  # every member really differs


def test_low_rank_step_in_one_batch_equals_the_sequential_step():
    ids = torch.randint(0, 12, (4, 10))
    finals = []
    for per_forward in (1, 0):
        model = tiny_lm(torch.float64)
        config = ZOConfig(num_probes=6, lr=0.1, perturbation="lowrank", probes_per_forward=per_forward)
        zo = ZOOptimizer(model, config)
        for _ in range(2):
            members = population_loss(model, zo.names, ids, ids, members=True) if per_forward != 1 else None
            zo.step(lm_loss(model, ids), population_loss=members)
        finals.append(snapshot(model))
    assert all(torch.allclose(a, b, rtol=0, atol=1e-10) for a, b in zip(*finals, strict=True))


def test_loss_shaping_ranks_and_standardises_the_population_and_keeps_nan_out():
    losses = torch.tensor([[3.0, 1.0], [float("nan"), 2.0], [10.0, 0.0]])
    ranks = shaped_losses(losses, "centered_ranks")
    assert torch.isnan(ranks[1, 0])
    finite = ranks[torch.isfinite(ranks)]
    assert sorted(finite.tolist()) == [-0.5, -0.25, 0.0, 0.25, 0.5]
    assert ranks[2, 0] == 0.5 and ranks[2, 1] == -0.5  # the largest loss ranks highest, an outlier counts as one rank
    z = shaped_losses(losses, "zscore")
    values = z[torch.isfinite(z)]
    assert abs(values.mean().item()) < 1e-6 and abs(values.std().item() - 1) < 1e-6
    assert shaped_losses(losses, "none") is losses
    # a reward scaled by 1000 gives the same ranked update: the step does not depend on the reward's scale
    torch.testing.assert_close(shaped_losses(losses * 1000, "centered_ranks"), ranks, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ValueError, match="needs difference='central'"):
        ZOConfig(loss_shaping="zscore", difference="forward")


def test_per_prompt_shaping_weighs_every_prompt_alike_and_ignores_prompts_without_spread():
    from hf_zoo_rnn.zo.estimator import prompt_means, shaped_losses

    losses = torch.tensor([[[0.0, 5.0, 1.0], [1.0, 5.0, 100.0]], [[0.0, 5.0, 2.0], [1.0, 5.0, math.nan]]])  # [2, 2, 3]
    means = prompt_means(losses)
    torch.testing.assert_close(means[1, 1], torch.tensor(3.0))  # NaN prompts are left out of a member's mean
    shaped = shaped_losses(losses, "per_prompt")
    # prompt 0 splits the members by sign, prompt 1 (no spread) adds nothing, prompt 2's outlier is z-scored
    zero = (losses[:, :, 0] - losses[:, :, 0].mean()) / losses[:, :, 0].std()
    finite = losses[:, :, 2][torch.isfinite(losses[:, :, 2])]
    two = (losses[:, :, 2] - finite.mean()) / finite.std()
    expected = torch.stack([zero, torch.zeros(2, 2), two], dim=-1)
    torch.testing.assert_close(shaped, prompt_means(expected))
    torch.testing.assert_close(shaped_losses(losses, "zscore"), shaped_losses(means, "zscore"))
    with pytest.raises(ValueError, match="one loss per prompt"):
        shaped_losses(means, "per_prompt")


def test_ask_and_tell_are_the_step_and_the_anchor_is_part_of_the_update():
    ids = torch.randint(0, 12, (4, 10))
    stepped, told = tiny_lm(), tiny_lm()
    told.load_state_dict(stepped.state_dict())
    anchor = [p.detach().clone() + 0.5 for p in stepped.parameters()]
    optimizers = [ZOOptimizer(m, ZOConfig(num_probes=4, lr=0.05, loss_shaping="zscore")) for m in (stepped, told)]
    for zo in optimizers:
        zo.set_anchor([a.clone() for a in anchor], decay=0.2)
    stats = optimizers[0].step(lm_loss(stepped, ids))
    population = optimizers[1].ask()
    assert [m[:2] for m in population.members()] == [(p, c) for p in range(4) for c in (0, 1)]
    losses = torch.empty(4, 2, dtype=torch.float64)
    optimizers[1].perturber.snapshot()
    for probe, column, scale in population.members():
        optimizers[1].perturber.perturb(probe, scale)
        losses[probe, column] = lm_loss(told, ids)().double()
    optimizers[1].perturber.restore()
    told_stats = optimizers[1].tell(population, losses)
    assert all(torch.equal(a, b) for a, b in zip(stepped.parameters(), told.parameters(), strict=True))
    assert stats.update_norm == told_stats.update_norm > 0
    with pytest.raises(ValueError, match="population of step 0"):
        optimizers[1].tell(population, losses)

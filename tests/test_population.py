"""The ES population as one batch: every member's completions from one batched forward per token, equal to each
perturbed model generating alone through transformers' `generate` (greedy and sampled, LSTM and GRU, left-padded
prompts of mixed lengths, end tokens), and the cell written once."""

import pytest
import torch
from conftest import small_config

from hf_zoo_rnn import ZooRnnForCausalLM, modeling_zoo_rnn
from hf_zoo_rnn.forwards.population import members_generate
from hf_zoo_rnn.zo import ZOConfig, ZOOptimizer

CONFIGS = {
    "lstm": {},
    "gru-2-norm": {"cell": "gru", "num_hidden_layers": 2, "layer_norm": True, "output_bias": True},
    "lstm-2-tied": {"num_hidden_layers": 2, "residual": True, "tie_word_embeddings": True},
}
PAD, EOS = 0, 1


def population(overrides: dict, rank: int, probes: int = 3, eps: float = 0.5):
    config = small_config(vocab_size=12, embedding_size=16, num_heads=2, head_dim=8, **overrides)
    config.eos_token_id, config.pad_token_id = EOS, PAD
    model = ZooRnnForCausalLM(config).double().eval().requires_grad_(False)
    for param in model.parameters():  # weights large enough that tokens depend on the input and the member
        param.normal_(0, 0.6)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = EOS, PAD
    zo = ZOOptimizer(model, ZOConfig(num_probes=probes, lr=0.1, perturbation="lowrank", perturbation_rank=rank))
    zo.directions.step = 3
    scales = (eps, -eps)
    members = [(probe, scale) for probe in range(probes) for scale in scales]
    return model, zo, dict(zip(zo.names, zo.perturber.members(range(probes), scales), strict=True)), members


def left_padded_prompts(rows: int = 4):
    """Prompts of 2 to 6 tokens, left-padded, none holding the end token."""
    lengths = [2, 6, 3, 5, 4, 6][:rows]
    ids = torch.full((rows, max(lengths)), PAD)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, -length:] = torch.randint(2, 12, (length,))
        mask[row, -length:] = 1
    return ids, mask


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("cpu_path", ["dense", "loop"])
def test_batched_members_generate_what_each_perturbed_model_generates_alone(overrides, sampled, cpu_path, monkeypatch):
    if cpu_path == "loop":
        monkeypatch.setattr(modeling_zoo_rnn, "DENSE_MAX_HIDDEN", 0)
    model, zo, changes, members = population(overrides, rank=2)
    ids, mask = left_padded_prompts()
    seeds = [1000 + m for m in range(len(members))]
    options = {"temperature": 0.7, "generators": [torch.Generator().manual_seed(s) for s in seeds]} if sampled else {}
    batched = members_generate(model, changes, ids, mask, 9, pad_token_id=PAD, eos_token_id=EOS, **options)
    assert batched.shape == (len(members), ids.shape[0], 9)
    zo.perturber.snapshot()
    alone = []
    for m, (probe, scale) in enumerate(members):
        zo.perturber.perturb(probe, scale)
        with torch.random.fork_rng():
            torch.manual_seed(seeds[m])
            sampling = {"do_sample": True, "temperature": 0.7, "top_k": 0} if sampled else {"do_sample": False}
            out = model.generate(ids, attention_mask=mask, max_new_tokens=9, pad_token_id=PAD, **sampling)
        zo.perturber.restore()
        generated = out[:, ids.shape[1] :]
        alone.append(torch.nn.functional.pad(generated, (0, 9 - generated.shape[1]), value=PAD))
    assert torch.equal(batched, torch.stack(alone))
    assert len({tuple(row.flatten().tolist()) for row in batched}) > 1  # the members really differ


def test_members_stop_at_the_end_token_and_pad_after_it():
    model, _, changes, members = population({}, rank=1, eps=0.0)
    with torch.no_grad():  # every member's greedy choice after any input is the end token
        model.lm_head.weight.zero_()
        model.lm_head.weight[EOS] = 0.0
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(12, dtype=torch.float64))
        model.lm_head.bias[EOS] = 5.0
    ids, mask = left_padded_prompts(2)
    out = members_generate(model, changes, ids, mask, 5, pad_token_id=PAD, eos_token_id=EOS)
    assert torch.equal(out[:, :, 0], torch.full((len(members), 2), EOS))
    assert torch.equal(out[:, :, 1:], torch.full((len(members), 2, 4), PAD))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_the_model_loop_runs_the_one_cell_and_its_outputs_equal_the_fused_kernel(cell, monkeypatch):
    """The head-major loop (the cell functions with a plain matmul hook) and ATen's fused kernel compute one cell."""
    model = ZooRnnForCausalLM(small_config(cell=cell)).double().eval()
    ids = torch.randint(0, 64, (2, 13))
    dense = model(ids).logits
    monkeypatch.setattr(modeling_zoo_rnn, "DENSE_MAX_HIDDEN", 0)
    torch.testing.assert_close(model(ids).logits, dense, rtol=1e-10, atol=1e-10)


def reward_objective(model, tokenizer, **options):
    from hf_zoo_rnn.rewards import Fluency, RewardObjective, distinct_4

    return RewardObjective(tokenizer, [distinct_4, Fluency(model, tokenizer)], [1.0, 0.1], max_new_tokens=8, **options)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_the_es_step_in_one_batch_equals_members_one_at_a_time(bpe_tokenizer, sampled):
    """The same population, batched and member by member through `generate`: the same completions, rewards to 1e-6
    (fluency's batched forward included), and so the same update."""
    import copy

    from hf_zoo_rnn.data.prompts import PromptBatch
    from hf_zoo_rnn.estimators.evolution import EvolutionStrategies

    config = small_config(vocab_size=len(bpe_tokenizer), embedding_size=16, num_heads=2, head_dim=8)
    config.eos_token_id = config.pad_token_id = bpe_tokenizer.eos_token_id
    start = ZooRnnForCausalLM(config).double().eval().requires_grad_(False)
    for param in start.parameters():
        param.normal_(0, 0.5)
    prompts = PromptBatch(["Licensed under the", "You may", "the terms and conditions of"], {})
    options = {"do_sample": True, "samples": 2, "temperature": 0.8} if sampled else {}
    zo_config = ZOConfig(
        num_probes=3, lr=0.01, eps=0.2, perturbation="lowrank", perturbation_rank=2, loss_shaping="per_prompt"
    )
    steps, completions = [], []
    for batched in (True, False):
        model = copy.deepcopy(start)
        objective = reward_objective(start, bpe_tokenizer, **options)
        step = EvolutionStrategies(model, ZOOptimizer(model, zo_config), objective, run_seed=7)
        step.batched = batched
        population = step.zo.ask()
        completions.append(step.completions(population, prompts.prompts))
        step.zo.step_count = 0
        report = step.train_step(prompts)
        steps.append((model, report))
    assert completions[0] == completions[1] and len(completions[0]) == 6
    assert len({tuple(texts) for texts in completions[0]}) > 1
    (batched_model, batched_report), (alone_model, alone_report) = steps
    assert batched_report.metrics["reward"] == pytest.approx(alone_report.metrics["reward"], abs=1e-6)
    for (name, a), b in zip(batched_model.named_parameters(), alone_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8, msg=name)
    assert not torch.equal(batched_model.lm_head.weight, start.lm_head.weight)  # it moved


def test_low_rank_members_run_on_a_bf16_model():
    """The members' changes come in fp32 (Perturber.members); a bf16 model (CUDA's default for reward training)
    runs them in its own dtype."""
    from hf_zoo_rnn.forwards.population import members_loss

    model, zo, changes, members = population({}, rank=1)
    model = model.to(torch.bfloat16)
    ids, mask = left_padded_prompts(2)
    out = members_generate(model, changes, ids, mask, 3, pad_token_id=PAD, eos_token_id=EOS)
    assert out.shape == (len(members), 2, 3)
    losses = members_loss(model, changes, ids, ids)
    assert losses.shape == (len(members),) and torch.isfinite(losses).all()

"""Exact local gradients: the readout's equals autograd's full gradient, the one-step gradient equals a
token-by-token autograd reference with the recurrent state detached between tokens."""

import pytest
import torch
from conftest import small_config

from hf_zoo_rnn import ZooRnnForCausalLM
from hf_zoo_rnn.estimators.local import LocalArguments, LocalGradient
from hf_zoo_rnn.forwards.local import accumulate_local_gradients, readout_parameter_names

VARIANTS = [
    dict(cell="lstm"),
    dict(cell="gru"),
    dict(cell="lstm", num_hidden_layers=2, layer_norm=True, residual=True, embedding_size=24),
    dict(cell="gru", num_hidden_layers=2, layer_norm=True),
]


def fp64_model(**overrides):
    torch.manual_seed(0)
    model = ZooRnnForCausalLM(small_config(vocab_size=20, **overrides)).double()
    with torch.no_grad():  # a non-zero readout bias and gate biases away from their init, so every term shows
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def batch(steps=13):
    torch.manual_seed(1)
    ids = torch.randint(0, 20, (3, steps))
    labels = ids.clone()
    labels[0, :4] = -100  # ignored positions count as in the model's own loss
    return ids, labels


def gradients(model, names):
    params = dict(model.named_parameters())
    return {name: params[name].grad.clone() for name in names}


@pytest.mark.parametrize("overrides", VARIANTS)
def test_readout_gradient_equals_the_full_autograd_gradient(overrides):
    model = fp64_model(**overrides)
    ids, labels = batch()
    names = readout_parameter_names(model)
    assert "lm_head.weight" in names and ("model.norm_f.weight" in names) == bool(overrides.get("layer_norm"))
    model.zero_grad()
    full = model(ids, labels=labels)
    full.loss.backward()  # backpropagation through time, for the reference only
    expected = gradients(model, names)

    model.zero_grad()
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
    loss = accumulate_local_gradients(model, ids, labels, "readout")
    assert loss == pytest.approx(full.loss.item(), rel=1e-12)
    for name, grad in gradients(model, names).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("overrides", VARIANTS)
def test_one_step_gradient_equals_a_token_by_token_reference_with_detached_state(overrides):
    model = fp64_model(**overrides)
    ids, labels = batch()
    count = int((labels[:, 1:] != -100).sum())
    model.zero_grad()
    state, reference_loss = None, 0.0
    for t in range(ids.shape[1] - 1):  # each token: the layers at t and one recurrent step, state detached
        out = model(ids[:, t : t + 1], state=state, use_cache=True)
        targets = labels[:, t + 1]
        loss = torch.nn.functional.cross_entropy(out.logits[:, 0], targets, ignore_index=-100, reduction="sum")
        (loss / count).backward()
        reference_loss += loss.item() / count
        state = tuple(s.detach() for s in out.state)
    names = [name for name, _ in model.named_parameters()]
    expected = gradients(model, names)

    model.zero_grad()
    loss = accumulate_local_gradients(model, ids, labels, "one_step")
    assert loss == pytest.approx(reference_loss, rel=1e-10)
    for name, grad in gradients(model, names).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-9, atol=1e-12, msg=name)


def test_one_step_and_readout_agree_on_the_readout():
    model = fp64_model(num_hidden_layers=2)
    ids, labels = batch(steps=17)
    names = readout_parameter_names(model)
    model.zero_grad()
    accumulate_local_gradients(model, ids, labels, "one_step")
    one_step = gradients(model, names)
    model.zero_grad()
    accumulate_local_gradients(model, ids, labels, "readout")
    for name, grad in gradients(model, names).items():
        torch.testing.assert_close(grad, one_step[name], rtol=1e-10, atol=1e-12)


def test_unknown_scope_is_a_clear_error():
    model = fp64_model()
    with pytest.raises(ValueError, match="one_step"):
        accumulate_local_gradients(model, *batch(), "two_step")


def test_a_non_finite_local_gradient_is_dropped_not_stepped():
    model = fp64_model()
    names = readout_parameter_names(model)
    args = LocalArguments(local_lr=0.1, local_lr_schedule="constant")
    gradient = LocalGradient(model, "readout", trained=names, surrogate=[], args=args, total_steps=10)
    ids, labels = batch()
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    gradient.accumulate(ids, labels)
    model.lm_head.weight.grad[0, 0] = float("nan")
    assert gradient.apply() is None  # dropped, not applied
    assert all(torch.equal(param, before[name]) for name, param in model.named_parameters())
    assert all(param.grad is None for param in model.parameters())
    gradient.accumulate(ids, labels)
    assert gradient.apply() == 0.1  # a finite gradient is applied, at the scheduled lr
    assert not torch.equal(model.lm_head.weight, before["lm_head.weight"])


def test_row_weights_weigh_each_sequences_one_step_gradient():
    """The policy-gradient seam: weights w give sum_i w_i * (row i's gradient), each row's share of the mean."""
    model = ZooRnnForCausalLM(small_config(num_hidden_layers=2)).double()
    ids = torch.randint(0, 64, (3, 12))
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt: not scored
    weights = torch.tensor([0.5, -2.0, 1.5], dtype=torch.float64)

    def gradient(rows, row_weights=None):
        model.zero_grad()
        accumulate_local_gradients(model, ids[rows], labels[rows], "one_step", row_weights)
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    torch.testing.assert_close(gradient([0, 1, 2], torch.ones(3, dtype=torch.float64)), gradient([0, 1, 2]))
    per_row = [gradient([i]) for i in range(3)]  # each a mean over its 8 scored positions, of 24 in all
    expected = sum(w * g for w, g in zip(weights, per_row, strict=True)) / 3
    torch.testing.assert_close(gradient([0, 1, 2], weights), expected, rtol=1e-10, atol=1e-12)

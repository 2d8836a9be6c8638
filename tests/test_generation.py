"""generate() against the truth: hand-written loops that carry the state or re-read the whole sequence.

These tests depend on transformers' generation loop, so CI also runs them against the oldest and the newest
transformers the package allows (`make test-transformers-range`)."""

import pytest
import torch
from conftest import small_config
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from hf_zoo_rnn import ZooRnnForCausalLM

pytestmark = pytest.mark.transformers  # depends on the transformers release: CI runs it on the whole range

CELLS = ["lstm", "gru"]
NEW_TOKENS = 12


def fp64_model(cell: str, layers: int = 2, **overrides) -> ZooRnnForCausalLM:
    model = ZooRnnForCausalLM(small_config(cell=cell, num_hidden_layers=layers, **overrides)).double().eval()
    with torch.no_grad():  # sharper logits than the init's, so the greedy path depends on the whole history
        model.lm_head.weight.mul_(20)
    return model


def greedy_carrying_state(model, prompt: torch.Tensor, steps: int, state=None) -> torch.Tensor:
    """The truth for cached decoding: the prompt once, then one token at a time with the state carried."""
    out = model(prompt, state=state)
    sequence = prompt
    for _ in range(steps):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, token], dim=1)
        out = model(token, state=out.state)
    return sequence


def greedy_rereading(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """The truth without any cache: every step re-reads the whole sequence."""
    sequence = prompt
    for _ in range(steps):
        token = model(sequence).logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, token], dim=1)
    return sequence


def greedy_dropping_state(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """What transformers 5.24 made of generate(): each new token predicted from the previous token alone."""
    out = model(prompt)
    sequence = prompt
    for _ in range(steps):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, token], dim=1)
        out = model(token)
    return sequence


@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("cell", CELLS)
def test_greedy_generate_equals_the_hand_loops(cell, layers):
    model = fp64_model(cell, layers)
    prompt = torch.randint(0, 64, (3, 7))
    truth = greedy_carrying_state(model, prompt, NEW_TOKENS)
    assert torch.equal(truth, greedy_rereading(model, prompt, NEW_TOKENS))
    # the test can fail: a generate that drops the state between steps produces other tokens
    assert not torch.equal(truth, greedy_dropping_state(model, prompt, NEW_TOKENS))
    for use_cache in (True, False):
        generated = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=use_cache)
        assert torch.equal(generated, truth), use_cache


@pytest.mark.parametrize("cell", CELLS)
def test_beam_search_is_the_same_with_and_without_cache(cell):
    model = fp64_model(cell)
    prompt = torch.randint(0, 64, (2, 6))
    options = dict(
        max_new_tokens=8,
        num_beams=4,
        num_return_sequences=3,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    cached = model.generate(prompt, use_cache=True, **options)
    uncached = model.generate(prompt, use_cache=False, **options)
    assert cached.sequences.shape == (6, 14)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, rtol=1e-10, atol=1e-10)
    # each returned beam's score is its own log-probability under the model, divided by its generated length
    for row, sequence in enumerate(cached.sequences):
        log_probs = model(sequence[None]).logits[0, 5:-1].log_softmax(-1)
        total = log_probs.gather(1, sequence[6:, None]).sum()
        torch.testing.assert_close(cached.sequences_scores[row].double(), total / 8, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cell", CELLS)
def test_sampling_with_several_sequences_is_the_same_with_and_without_cache(cell):
    model = fp64_model(cell)
    prompt = torch.randint(0, 64, (2, 5))
    samples = []
    for use_cache in (True, False):
        torch.manual_seed(3)
        samples.append(
            model.generate(prompt, max_new_tokens=10, do_sample=True, num_return_sequences=3, use_cache=use_cache)
        )
    assert samples[0].shape == (6, 15)
    assert torch.equal(samples[0], samples[1])
    assert len({tuple(row.tolist()) for row in samples[0]}) > 1  # the samples differ: this is not greedy


@pytest.mark.parametrize("cell", CELLS)
def test_generate_from_inputs_embeds_equals_from_ids(cell):
    model = fp64_model(cell)
    prompt = torch.randint(0, 64, (2, 6))
    truth = greedy_carrying_state(model, prompt, NEW_TOKENS)[:, 6:]
    embeds = model.get_input_embeddings()(prompt)
    for use_cache in (True, False):
        generated = model.generate(inputs_embeds=embeds, max_new_tokens=NEW_TOKENS, use_cache=use_cache)
        assert torch.equal(generated, truth), use_cache


@pytest.mark.parametrize("cell", CELLS)
def test_generate_continues_from_a_given_state(cell):
    model = fp64_model(cell)
    history, prompt = torch.randint(0, 64, (2, 9)), torch.randint(0, 64, (2, 4))
    state = model(history).state
    truth = greedy_carrying_state(model, prompt, NEW_TOKENS, state=state)
    assert not torch.equal(truth, greedy_carrying_state(model, prompt, NEW_TOKENS))  # the state matters
    for use_cache in (True, False):
        generated = model.generate(prompt, state=state, max_new_tokens=NEW_TOKENS, use_cache=use_cache)
        assert torch.equal(generated, truth), use_cache
    beams = model.generate(prompt, state=state, max_new_tokens=4, num_beams=3, num_return_sequences=3)
    whole = model.generate(torch.cat([history, prompt], 1), max_new_tokens=4, num_beams=3, num_return_sequences=3)
    assert torch.equal(beams[:, 4:], whole[:, 13:])


def test_a_left_padded_batch_generates_each_row_as_alone_without_cache():
    model = fp64_model("lstm")
    prompts = [torch.randint(1, 64, (n,)) for n in (3, 11, 6)]
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    for use_cache in (True, False):
        together = model.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0, use_cache=use_cache)
        for row, prompt in enumerate(prompts):
            alone = greedy_carrying_state(model, prompt[None], 6)
            assert torch.equal(together[row, width:], alone[0, len(prompt) :]), (use_cache, row)


class Collector(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        pass


def test_a_streamer_receives_the_generated_tokens():
    model = fp64_model("gru")
    prompt = torch.randint(0, 64, (1, 5))
    streamer = Collector()
    generated = model.generate(prompt, max_new_tokens=NEW_TOKENS, streamer=streamer)
    assert torch.equal(generated, greedy_carrying_state(model, prompt, NEW_TOKENS))
    streamed = torch.cat([chunk.reshape(1, -1) for chunk in streamer.chunks], dim=1)
    assert torch.equal(streamed, generated)


def test_generate_after_save_and_load_equals_the_hand_loop(tmp_path):
    model = fp64_model("lstm")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    prompt = torch.randint(0, 64, (2, 5))
    assert torch.equal(
        loaded.generate(prompt, max_new_tokens=NEW_TOKENS), greedy_carrying_state(model, prompt, NEW_TOKENS)
    )


def counting(function, calls: list):
    def counted(*args):
        calls.append(1)
        return function(*args)

    return counted


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("cell", CELLS)
def test_activation_checkpointing_gives_the_plain_gradient(cell, reentrant):
    model = fp64_model(cell, layers=2, layer_norm=True).train()
    ids = torch.randint(0, 64, (2, 23))  # chunk_size 5: five chunks, the state carried across them
    model(ids, labels=ids).loss.backward()
    plain = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    calls = []
    model.model.layers[0].recur = counting(model.model.layers[0].recur, calls)
    model(ids, labels=ids).loss.backward()
    assert len(calls) == 2 * 5  # each of the 5 chunks ran again in the backward: it was checkpointed
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[name], rtol=1e-10, atol=1e-12, msg=name)
    with torch.no_grad():  # generation in training mode still runs (no backward, nothing checkpointed)
        assert model.generate(ids[:, :4], max_new_tokens=3).shape == (2, 7)

"""The model: backend parity, chunking, generation, serialisation, Auto classes and bad configs."""

import json

import pytest
import torch
from conftest import small_config
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, pipeline

from hf_zoo_rnn import ZooRnnConfig, ZooRnnForCausalLM, ZooRnnModel, modeling_zoo_rnn
from hf_zoo_rnn.forwards.population import stacked_loss
from hf_zoo_rnn.modeling_zoo_rnn import TORCH_CELLS, ZooRnnLayer, cpu_path, run_recurrence

pytestmark = pytest.mark.transformers  # depends on the transformers release: CI runs it on the whole range

CELLS = ["lstm", "gru"]
HEAD_SHAPES = [(1, 12), (3, 8), (20, 4)]


def random_recurrence_inputs(cell, heads, dim, dtype, batch=3, steps=11, in_size=10):
    input_gates, recurrent_gates, states = (4, 4, 2) if cell == "lstm" else (3, 3, 1)
    return (
        torch.randn(batch, steps, in_size, dtype=dtype),
        torch.randn(input_gates * heads * dim, in_size, dtype=dtype) * 0.3,
        torch.randn(recurrent_gates, heads, dim, dim, dtype=dtype) * 0.3,
        torch.randn(4, heads, dim, dtype=dtype),
        torch.randn(states, batch, heads, dim, dtype=dtype),
    )


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("heads,dim", HEAD_SHAPES)
@pytest.mark.parametrize("kind", ["dense", "loop"])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_cpu_paths_match_flashrnn_vanilla(cell, heads, dim, kind, dtype, tolerance):
    inputs = random_recurrence_inputs(cell, heads, dim, dtype)
    reference_h, reference_state = run_recurrence(cell, "vanilla", *inputs)
    h, state = TORCH_CELLS[cell, kind](*inputs)
    assert h.shape == reference_h.shape and state.shape == reference_state.shape
    assert (h - reference_h).abs().max() <= tolerance
    assert (state - reference_state).abs().max() <= tolerance


def test_cpu_path_choice_follows_the_measured_crossover():
    assert cpu_path(num_heads=1, hidden_size=4096) == "dense"  # a single head is nn.LSTM's own shape
    assert cpu_path(num_heads=12, hidden_size=240) == "dense"  # paper tiny: the expansion is cheap
    assert cpu_path(num_heads=32, hidden_size=1600) == "loop"  # paper small: dense would do 32x the work


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_model_backends_agree(cell, dtype, tolerance):
    ids = torch.randint(0, 64, (2, 23))
    model = ZooRnnForCausalLM(small_config(cell=cell, num_hidden_layers=2)).to(dtype).eval()
    outputs = {}
    for backend in ("torch", "vanilla"):
        model.config.backend = backend
        for layer in model.model.layers:
            layer.configured_backend = backend
        outputs[backend] = model(ids, labels=ids)
    torch_out, vanilla_out = outputs["torch"], outputs["vanilla"]
    assert (torch_out.logits - vanilla_out.logits).abs().max() <= tolerance
    assert abs(torch_out.loss.item() - vanilla_out.loss.item()) <= tolerance
    for a, b in zip(torch_out.state, vanilla_out.state, strict=True):
        assert (a - b).abs().max() <= tolerance


@pytest.mark.parametrize("cell", CELLS)
def test_conversion_from_torch_rnn_matches(cell):
    from hf_zoo_rnn.conversion import load_torch_rnn_weights

    rnn_class = torch.nn.LSTM if cell == "lstm" else torch.nn.GRU
    rnn = rnn_class(16, 24, num_layers=2, batch_first=True).double()
    model = ZooRnnModel(small_config(cell=cell, num_heads=1, head_dim=24, num_hidden_layers=2)).double()
    load_torch_rnn_weights(model, rnn)
    x = torch.randn(3, 13, 16, dtype=torch.float64)
    expected, _ = rnn(x)
    assert (model(inputs_embeds=x).last_hidden_state - expected).abs().max() <= 1e-10


def test_conversion_rejects_mismatched_shapes():
    from hf_zoo_rnn.conversion import load_torch_rnn_weights

    model = ZooRnnModel(small_config(cell="lstm"))
    with pytest.raises(ValueError, match="num_heads=1 and head_dim=24"):
        load_torch_rnn_weights(model, torch.nn.LSTM(16, 24))
    with pytest.raises(ValueError, match="rnn is GRU but config.cell is 'lstm'"):
        load_torch_rnn_weights(model, torch.nn.GRU(16, 24))


@pytest.mark.parametrize("cell", CELLS)
def test_chunked_and_token_by_token_equal_full_run(cell):
    ids = torch.randint(0, 64, (2, 31))
    whole = ZooRnnForCausalLM(small_config(cell=cell, chunk_size=1000, num_hidden_layers=2)).double().eval()
    chunked = ZooRnnForCausalLM(small_config(cell=cell, chunk_size=4, num_hidden_layers=2)).double().eval()
    chunked.load_state_dict(whole.state_dict())
    full = whole(ids, labels=ids)
    split = chunked(ids, labels=ids)
    assert (full.logits - split.logits).abs().max() <= 1e-12
    assert abs(full.loss.item() - split.loss.item()) <= 1e-12

    state, step_logits = None, []
    for t in range(ids.shape[1]):
        out = whole(ids[:, t : t + 1], state=state)
        state = out.state
        step_logits.append(out.logits)
    assert (torch.cat(step_logits, dim=1) - full.logits).abs().max() <= 1e-12
    for a, b in zip(state, full.state, strict=True):
        assert (a - b).abs().max() <= 1e-12


def test_loss_counts_every_target_and_logits_to_keep_bounds_output():
    model = ZooRnnForCausalLM(small_config(chunk_size=4)).double().eval()
    ids = torch.randint(0, 64, (2, 17))
    labels = ids.clone()
    labels[:, :5] = -100
    full = model(ids, labels=labels)
    reference = torch.nn.functional.cross_entropy(full.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    assert abs(full.loss.item() - reference.item()) <= 1e-12
    last_only = model(ids, labels=labels, logits_to_keep=1)
    assert last_only.logits.shape == (2, 1, 64)
    assert last_only.loss.item() == full.loss.item()
    assert torch.equal(last_only.logits, full.logits[:, -1:])


def left_padded(prompts: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.full((width - len(p),), pad), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(width - len(p)), torch.ones(len(p))]) for p in prompts]).long()
    return ids, mask


@pytest.mark.parametrize(
    "overrides", [{}, {"cell": "gru", "num_hidden_layers": 2, "layer_norm": True}], ids=["lstm", "gru-2"]
)
def test_a_left_padded_batch_computes_each_row_as_alone(overrides):
    model = ZooRnnForCausalLM(small_config(**overrides)).double().eval()  # chunk_size 5: padding crosses chunks
    prompts = [torch.randint(1, 64, (n,)) for n in (3, 13, 9, 1)]
    ids, mask = left_padded(prompts, pad=0)
    labels = ids.masked_fill(mask == 0, -100)
    batch = model(ids, attention_mask=mask, labels=labels)
    loss_sum, count = 0.0, 0
    for row, prompt in enumerate(prompts):
        alone = model(prompt[None], labels=prompt[None])
        torch.testing.assert_close(batch.logits[row, -len(prompt) :], alone.logits[0], rtol=1e-10, atol=1e-10)
        for got, expected in zip(batch.state, alone.state, strict=True):
            torch.testing.assert_close(got[:, row], expected[:, 0], rtol=1e-10, atol=1e-10)
        if len(prompt) > 1:  # a one-token prompt has no next-token target
            loss_sum, count = loss_sum + alone.loss.item() * (len(prompt) - 1), count + len(prompt) - 1
    assert batch.loss.item() == pytest.approx(loss_sum / count, rel=1e-10)
    for options in ({"do_sample": False}, {"num_beams": 3, "do_sample": False}):
        together = model.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0, **options)
        for row, prompt in enumerate(prompts):
            alone = model.generate(prompt[None], max_new_tokens=6, pad_token_id=0, **options)
            assert torch.equal(together[row, ids.shape[1] :], alone[0, len(prompt) :]), (options, row)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_masked_positions_anywhere_are_skipped_as_if_absent(cell):
    """Right padding (what TRL's prompt + completion batches carry) and masked tokens in between: a row computes what
    it would without them, logits at its read positions and its final state alike."""
    model = ZooRnnForCausalLM(small_config(cell=cell, num_hidden_layers=2)).double().eval()  # chunk_size 5
    ids = torch.randint(1, 64, (3, 13))
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0  # right padding across a chunk boundary
    mask[1, :2], mask[1, 6:8], mask[1, 12:] = 0, 0, 0  # left, inside, right
    out = model(ids, attention_mask=mask, labels=ids)
    for row in range(3):
        read = mask[row].bool()
        alone = model(ids[row, read][None])
        torch.testing.assert_close(out.logits[row, read], alone.logits[0], rtol=1e-10, atol=1e-10)
        for got, expected in zip(out.state, alone.state, strict=True):
            torch.testing.assert_close(got[:, row], expected[:, 0], rtol=1e-10, atol=1e-10)


def test_pipeline_generates_a_batch_of_prompts_of_different_lengths(bpe_tokenizer):
    model = ZooRnnForCausalLM(small_config(vocab_size=len(bpe_tokenizer))).eval()
    bpe_tokenizer.padding_side = "left"
    prompts = ["Licensed", "the Apache License, Version", "you may not use this file except", "Unless required"]
    generator = pipeline("text-generation", model=model, tokenizer=bpe_tokenizer)
    options = {"max_new_tokens": 5, "do_sample": False, "return_full_text": False}
    batched = [out[0]["generated_text"] for out in generator(prompts, batch_size=4, **options)]
    assert batched == [generator(prompt, **options)[0]["generated_text"] for prompt in prompts]


def test_transformers_output_contracts():
    model = ZooRnnForCausalLM(small_config(num_hidden_layers=2, layer_norm=True)).eval()
    ids = torch.randint(0, 64, (2, 12))
    out = model(ids, labels=ids, output_hidden_states=True)
    assert len(out.hidden_states) == 3 and all(h.shape[:2] == (2, 12) for h in out.hidden_states)
    torch.testing.assert_close(out.hidden_states[0], model.model.embeddings(ids))
    torch.testing.assert_close(out.hidden_states[-1], model.model(ids).last_hidden_state)
    loss, logits, state = model(ids, labels=ids, return_dict=False)[:3]
    torch.testing.assert_close((loss, logits), (out.loss, out.logits))  # chunked vs whole-sequence matmuls
    assert len(state) == 2
    assert isinstance(model.model(ids, return_dict=False), tuple)
    shifted = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
    torch.testing.assert_close(model(ids, shift_labels=shifted).loss, out.loss)
    torch.testing.assert_close(model(ids, labels=ids, num_items_in_batch=11).loss, out.loss * 22 / 11)
    model(ids, position_ids=torch.arange(12)[None], output_attentions=False)  # what transformers passes: accepted
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['token_type_ids'\]"):
        model(ids, token_type_ids=torch.zeros_like(ids))
    with pytest.raises(ValueError, match="no attention layers"):
        model(ids, output_attentions=True)


def test_an_empty_input_is_one_clear_error():
    model = ZooRnnForCausalLM(small_config()).eval()
    empty = torch.empty(1, 0, dtype=torch.long)
    for call in (lambda: model(empty), lambda: model.model(empty), lambda: model.generate(empty, max_new_tokens=2)):
        with pytest.raises(ValueError, match="needs at least one input token, got none"):
            call()


def test_save_and_from_pretrained_give_identical_logits(tmp_path):
    model = ZooRnnForCausalLM(small_config(cell="gru", layer_norm=True)).eval()
    ids = torch.randint(0, 64, (2, 9))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "zoo_rnn"
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_zoo_rnn.ZooRnnForCausalLM"
    assert (tmp_path / "modeling_zoo_rnn.py").is_file() and (tmp_path / "configuration_zoo_rnn.py").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, ZooRnnForCausalLM)
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_tied_embeddings_share_storage_and_survive_save(tmp_path):
    config = small_config(embedding_size=24, tie_word_embeddings=True, residual=True, layer_norm=True)
    model = ZooRnnForCausalLM(config)
    assert model.lm_head.weight.data_ptr() == model.model.embeddings.weight.data_ptr()
    model.save_pretrained(tmp_path)
    loaded = ZooRnnForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embeddings.weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_auto_classes_and_pipeline(bpe_tokenizer):
    config = AutoConfig.for_model("zoo_rnn", vocab_size=len(bpe_tokenizer), embedding_size=16, num_heads=2, head_dim=8)
    assert isinstance(config, ZooRnnConfig)
    assert isinstance(AutoModel.from_config(config), ZooRnnModel)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert isinstance(model, ZooRnnForCausalLM)
    generator = pipeline("text-generation", model=model, tokenizer=bpe_tokenizer)
    result = generator("Licensed under the", max_new_tokens=8, do_sample=False)
    text = result[0]["generated_text"]
    assert text.startswith("Licensed under the") and len(text) > len("Licensed under the")


def test_bfloat16_forward_is_finite_and_close_to_float32():
    model = ZooRnnForCausalLM(small_config(num_hidden_layers=2)).eval()
    ids = torch.randint(0, 64, (2, 20))
    reference = model(ids, labels=ids)
    low = model.to(torch.bfloat16)(ids, labels=ids)
    assert low.logits.dtype == torch.bfloat16
    assert torch.isfinite(low.logits).all()
    assert abs(low.loss.item() - reference.loss.item()) < 0.05


def test_explicit_backend_that_cannot_run_fails_clearly():
    model = ZooRnnForCausalLM(small_config(backend="cuda_fused"))
    with pytest.raises(ValueError, match="backend='cuda_fused' runs on CUDA only"):
        model(torch.randint(0, 64, (1, 4)))


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"cell": "rnn"}, "cell must be one of"),
        ({"num_heads": 0}, "num_heads must be a positive integer"),
        ({"backend": "fast"}, "backend must be one of"),
        ({"residual": True}, "residual needs embedding_size == hidden_size"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings needs embedding_size == hidden_size"),
    ],
)
def test_invalid_config_names_the_field(overrides, message):
    with pytest.raises(Exception, match=message):
        small_config(**overrides)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize(
    "backend,dtype,tolerance", [("cuda", torch.float32, 1e-4), ("cuda_fused", torch.bfloat16, 5e-2)]
)
def test_flashrnn_cuda_matches_cpu(cell, backend, dtype, tolerance):
    config = small_config(cell=cell, num_heads=2, head_dim=64, embedding_size=32, chunk_size=16)
    model = ZooRnnForCausalLM(config).eval()
    ids = torch.randint(0, 64, (8, 40))
    with torch.no_grad():
        reference = model(ids).logits
        gpu = ZooRnnForCausalLM(small_config(**{**config.to_diff_dict(), "backend": backend}))
        gpu.load_state_dict(model.state_dict())
        logits = gpu.to("cuda", dtype).eval()(ids.cuda()).logits.float().cpu()
    assert (logits - reference).abs().max() <= tolerance


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize(
    "variant",
    [
        {},  # the paper's model: one layer, untied head with bias
        {"num_hidden_layers": 2, "layer_norm": True, "embedding_size": 24, "residual": True},
        {"tie_word_embeddings": True, "output_bias": False, "embedding_size": 24},
    ],
)
def test_stacked_loss_equals_each_models_own_forward(cell, variant):
    """P models with different weights, run as one model of P * N heads, give each model's own loss."""
    torch.manual_seed(0)
    model = ZooRnnForCausalLM(small_config(cell=cell, **variant)).double().eval()
    names = [name for name, _ in model.named_parameters()]
    copies = 3
    stacks = {
        name: p.detach() + 0.3 * torch.randn(copies, *p.shape, dtype=p.dtype) for name, p in model.named_parameters()
    }
    ids = torch.randint(0, 64, (2, 13))  # chunk_size 5: the state crosses two chunk boundaries
    labels = ids.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        stacked = stacked_loss(model, stacks, ids, labels)
        expected = []
        for copy in range(copies):
            for name, param in model.named_parameters():
                param.copy_(stacks[name][copy])
            expected.append(model(ids, labels=labels).loss)
    assert stacked.shape == (copies,) and len(set(names)) == len(stacks)
    assert (stacked - torch.stack(expected)).abs().max() <= 1e-10
    assert (stacked[1:] - stacked[:-1]).abs().min() > 1e-4  # the copies really differ


def test_auto_backend_falls_back_to_cuda_when_the_fused_kernel_cannot_be_built(monkeypatch):
    """flashrnn 1.0.8 cannot build its fused kernel's gpu_info extension under CUDA 13 (RuntimeError): "auto" runs
    FlashRNN's `cuda` backend instead, and no later layer of the process retries the build; an explicit cuda_fused
    and any other error still raise."""
    monkeypatch.setattr(modeling_zoo_rnn, "resolve_backend", lambda requested, cell, device: "cuda_fused")
    monkeypatch.setattr(modeling_zoo_rnn, "FUSED_BUILD_ERROR", None)
    calls = []

    def run(cell, backend, *inputs):
        calls.append(backend)
        if backend == "cuda_fused":
            raise RuntimeError("Error building extension 'gpu_info2'")
        return backend

    layers = [ZooRnnLayer(small_config(backend="auto"), 16) for _ in range(2)]
    assert layers[0].recur(run, torch.zeros(1)) == "cuda" and layers[1].recur(run, torch.zeros(1)) == "cuda"
    assert calls == ["cuda_fused", "cuda", "cuda"]  # the second layer never retried the build
    with pytest.raises(RuntimeError, match="Error building extension"):
        ZooRnnLayer(small_config(backend="cuda_fused"), 16).recur(run, torch.zeros(1))
    monkeypatch.setattr(modeling_zoo_rnn, "FUSED_BUILD_ERROR", None)

    def broken(cell, backend, *inputs):
        raise RuntimeError("CUDA error: an illegal memory access")

    with pytest.raises(RuntimeError, match="illegal memory"):
        ZooRnnLayer(small_config(backend="auto"), 16).recur(broken, torch.zeros(1))

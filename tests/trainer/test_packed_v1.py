"""The fused output-projection loss (issue 18: v1 training speed) and packed v1 training.

`LinearCrossEntropy` must compute what linear + log_softmax + nll_loss compute (loss and every gradient), in
both its keep and recompute modes, in fp32 and in bf16 (autocast or bf16 weights: the projections in bf16,
the softmax in fp32, as the layer call then `.float()`); heads it cannot see through keep the plain call; a packed v1 batch
trained through the engine's loss gives the per-sample losses and gradients of training each sample alone.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from glmtune_trainer import loss as loss_module
from glmtune_trainer.data.collate import Collator
from glmtune_trainer.data.encode import SampleEncoder
from glmtune_trainer.data.formats import Sample
from glmtune_trainer.data.packing import pack_lengths
from glmtune_trainer.engine import CausalLMLoss
from glmtune_trainer.loss import chunked_cross_entropy
from testkit import record_of


def _hidden_and_labels(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 13, 16, generator=generator)
    labels = torch.randint(0, vocab, (2, 13), generator=generator)
    labels[:, :3] = -100
    labels[1, 9:] = -100
    return hidden, labels


def _autograd_reference(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Linear, scale: float):
    """Loss and gradients (hidden, weight, bias) of the plain composition: linear, log_softmax, nll_loss."""
    hidden = hidden.clone().requires_grad_(True)
    head.zero_grad(set_to_none=True)
    logits = F.linear(hidden[:, :-1], head.weight, head.bias)
    loss = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")
    (loss * scale).backward()
    bias = head.bias.grad.clone() if head.bias is not None else None
    return loss.detach(), hidden.grad, head.weight.grad.clone(), bias


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("keep_logits_bytes", [0, 1 << 30], ids=["recompute", "keep"])
def test_fused_head_loss_and_gradients_equal_linear_log_softmax_nll(bias: bool, keep_logits_bytes: int,
                                                                     monkeypatch) -> None:
    monkeypatch.setattr(loss_module, "PASS_BYTES", 4 * 37 * 3)  # the softmax 3 rows at a time: several passes
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 37, bias=bias)
    hidden, labels = _hidden_and_labels(37)
    expected_loss, expected_hidden, expected_weight, expected_bias = _autograd_reference(hidden, labels, head, 0.37)
    head.zero_grad(set_to_none=True)
    hidden = hidden.clone().requires_grad_(True)
    total, count = chunked_cross_entropy(hidden, labels, head, chunk_size=5, keep_logits_bytes=keep_logits_bytes)
    assert type(total.grad_fn).__name__ == "LinearCrossEntropyBackward"  # the fused path, not the layer call
    (total * 0.37).backward()
    assert count == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(total, expected_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(hidden.grad, expected_hidden, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(head.weight.grad, expected_weight, rtol=1e-5, atol=1e-7)
    if bias:
        torch.testing.assert_close(head.bias.grad, expected_bias, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # evaluation: the loss alone
        torch.testing.assert_close(chunked_cross_entropy(hidden, labels, head, chunk_size=5)[0], total.detach())


def _bf16_reference(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Linear, autocast: bool):
    """Loss and gradients (hidden, weight, bias) of the layer call in bf16, `.float()`, cross-entropy."""
    hidden = hidden.clone().requires_grad_(True)
    head.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = head(hidden[:, :-1].flatten(0, 1)).float()  # [rows, hidden] as the plain path calls it
        loss = F.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")
    (loss * 0.37).backward()
    return loss.detach(), hidden.grad, head.weight.grad, head.bias.grad


@pytest.mark.parametrize("keep_logits_bytes", [0, 1 << 30], ids=["recompute", "keep"])
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "bf16-weights"])
def test_fused_head_in_bf16_computes_what_the_bf16_layer_call_and_a_float_loss_compute(
        autocast: bool, keep_logits_bytes: int, monkeypatch) -> None:
    """Under bf16 autocast (fp32 weights, cast as autocast casts them) or with bf16 weights and inputs."""
    monkeypatch.setattr(loss_module, "PASS_BYTES", 4 * 37 * 3)
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 37, bias=True)
    hidden, labels = _hidden_and_labels(37)
    if not autocast:
        head, hidden = head.bfloat16(), hidden.bfloat16()
    expected = _bf16_reference(hidden, labels, head, autocast)
    head.zero_grad(set_to_none=True)
    hidden = hidden.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        total, _ = chunked_cross_entropy(hidden, labels, head, chunk_size=5, keep_logits_bytes=keep_logits_bytes)
    assert type(total.grad_fn).__name__ == "LinearCrossEntropyBackward" and total.dtype == torch.float32
    (total * 0.37).backward()
    got = (total.detach(), hidden.grad, head.weight.grad, head.bias.grad)
    for value, reference in zip(got, expected, strict=True):
        assert value.dtype == reference.dtype  # gradients in the inputs' dtypes (fp32 master weights stay fp32)
        # bf16 rounds the gradients (8 significant bits) at slightly different points than autograd does
        torch.testing.assert_close(value, reference, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(total, expected[0], rtol=1e-5, atol=1e-5)  # the same bf16 logits, fp32 softmax


@pytest.mark.parametrize("keep_logits_bytes", [0, 1 << 30], ids=["recompute", "keep"])
def test_a_target_whose_probability_vanishes_gets_its_exact_loss_and_gradient(keep_logits_bytes: int) -> None:
    """-log p is exact only above the subnormals: a target 120 nats below the rest (p ~ 1e-52) takes the
    log-softmax of its row's logits instead, so the loss stays finite and equal to the plain composition's."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 37, bias=True)
    hidden, labels = _hidden_and_labels(37)
    with torch.no_grad():
        head.bias[labels[0, 5]] = -120.0
    expected_loss, expected_hidden, expected_weight, expected_bias = _autograd_reference(hidden, labels, head, 1.0)
    head.zero_grad(set_to_none=True)
    hidden = hidden.clone().requires_grad_(True)
    total, _ = chunked_cross_entropy(hidden, labels, head, chunk_size=5, keep_logits_bytes=keep_logits_bytes)
    total.backward()
    assert expected_loss > 120
    torch.testing.assert_close(total, expected_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(hidden.grad, expected_hidden, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(head.weight.grad, expected_weight, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(head.bias.grad, expected_bias, rtol=1e-5, atol=1e-7)


def test_fused_head_trains_only_what_requires_grad_and_backs_up_twice_with_a_retained_graph() -> None:
    head = torch.nn.Linear(16, 29, bias=False).requires_grad_(False)  # LoRA: the output layer is frozen
    hidden, labels = _hidden_and_labels(29, seed=1)
    hidden.requires_grad_(True)
    for keep_logits_bytes in (1 << 30, 0):
        hidden.grad = None
        total, _ = chunked_cross_entropy(hidden, labels, head, chunk_size=4, keep_logits_bytes=keep_logits_bytes)
        total.backward(retain_graph=True)
        assert head.weight.grad is None and hidden.grad is not None
        first = hidden.grad.clone()
        total.backward()  # the kept buffer holds the logits' gradient, not consumed by a backward pass
        torch.testing.assert_close(hidden.grad, 2 * first)


def test_heads_the_fused_loss_cannot_see_through_are_called_as_modules() -> None:
    """A forward hook (DeepSpeed ZeRO-3 gathers the weight in one) or fp16 autocast must reach the layer call."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 23, bias=False)
    hidden, labels = _hidden_and_labels(23, seed=2)
    expected, *_ = _autograd_reference(hidden, labels, head, 1.0)
    calls = []
    handle = head.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    total, count = chunked_cross_entropy(hidden, labels, head, chunk_size=8)
    handle.remove()
    assert sum(calls) == count and type(total.grad_fn).__name__ != "LinearCrossEntropyBackward"
    torch.testing.assert_close(total, expected, rtol=1e-6, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.float16):
        low, _ = chunked_cross_entropy(hidden, labels, head)
    assert type(low.grad_fn).__name__ != "LinearCrossEntropyBackward"
    torch.testing.assert_close(low, expected, rtol=2e-2, atol=0.0)  # computed in fp16 like the layer call


def test_packed_v1_training_loss_and_gradients_equal_training_each_sample_alone(tiny_model) -> None:
    """Full fine-tuning (the tied 130k-style head gets weight gradients through the fused loss): the packed
    batch's loss sum and every gradient equal the sums over the windows run alone through the model's own
    `labels=` loss (the original code's objective)."""
    from glmtune.modeling import load_model
    from glmtune.tokenization import load_tokenizer

    model_dir = tiny_model("v1")
    tokenizer = load_tokenizer(model_dir)
    torch.manual_seed(0)
    model = load_model(model_dir, dtype="float32").train()
    for module in model.modules():  # determinism: compare exact arithmetic, not dropout draws
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    encoder = SampleEncoder(tokenizer, "v1", "packing", 40)
    samples = [Sample("你好", "你好！我是助手。"), Sample("今天天气怎么样？", "晴天，适合出门散步。"),
               Sample("讲个故事", "从前有座山，山里有座庙。" * 3), Sample("1+1=?", "2")]
    windows = [w for i, s in enumerate(samples) for w in encoder.encode(s, i)]
    params = [p for p in model.parameters() if p.requires_grad]

    expected_total, expected_count = torch.zeros(()), 0
    for w in windows:
        labels = torch.from_numpy(record_of([w]).labels())[None]
        count = int((labels[:, 1:] != -100).sum())
        if count:
            loss = model(input_ids=torch.tensor([w.ids]), labels=labels).loss * count
            loss.backward()
            expected_total, expected_count = expected_total + loss.detach(), expected_count + count
    expected_grads = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)

    groups = pack_lengths([len(w) for w in windows], 80)
    assert len(groups) < len(windows)  # really packed
    batch = Collator("v1", tokenizer.pad_token_id)([record_of([windows[i] for i in g]) for g in groups])
    total, count, _ = CausalLMLoss(model)(**batch)
    assert type(total.grad_fn).__name__ == "LinearCrossEntropyBackward"
    total.backward()
    assert count == expected_count
    torch.testing.assert_close(total, expected_total, rtol=1e-5, atol=1e-4)
    for param, expected in zip(params, expected_grads, strict=True):
        torch.testing.assert_close(param.grad, expected, rtol=1e-4, atol=1e-6)

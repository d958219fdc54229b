"""The chunked label-only loss equals the plain loss; the NaN guard skips bad steps and stops a hopeless run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from glmtune_trainer import engine as engine_module
from glmtune_trainer.guard import NonFiniteGuard, NonFiniteLossError
from glmtune_trainer.loss import chunked_cross_entropy
from glmtune_trainer.metrics import read_metrics
from glmtune_trainer.run import train_spec


@pytest.mark.parametrize("keep_logits_bytes", [0, 1 << 30], ids=["recompute", "keep"])
def test_chunked_loss_equals_full_logits_loss_with_the_same_gradients(keep_logits_bytes: int) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False)
    labels = torch.randint(0, 50, (3, 11))
    labels[:, :4] = -100
    labels[1, 7:] = -100
    full = F.cross_entropy(head(hidden)[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100)
    full.backward()
    expected_hidden, expected_head = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad = head.weight.grad = None
    total, count = chunked_cross_entropy(hidden, labels, head, chunk_size=4, keep_logits_bytes=keep_logits_bytes)
    (total / count).backward()
    assert count == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(total / count, full)
    torch.testing.assert_close(hidden.grad, expected_hidden)
    torch.testing.assert_close(head.weight.grad, expected_head)


def test_loss_without_labels_is_zero_and_keeps_the_graph() -> None:
    hidden = torch.randn(1, 5, 4, requires_grad=True)
    total, count = chunked_cross_entropy(hidden, torch.full((1, 5), -100), torch.nn.Linear(4, 9))
    total.backward()
    assert count == 0 and float(total) == 0.0 and hidden.grad is not None


def test_guard_counts_skips_and_stops_after_the_limit_with_advice() -> None:
    guard = NonFiniteGuard(max_consecutive=3, precision="fp16")
    assert guard.record(False, 1) is False and guard.record(True, 2) is True
    guard.record(False, 3)
    guard.record(False, 4)
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps.*bf16"):
        guard.record(False, 5)
    assert guard.skipped_total == 4


def _poison_steps(monkeypatch: pytest.MonkeyPatch, bad_calls: set[int]) -> None:
    """Make the loss NaN on the given forward calls (1-based), as an fp16 overflow would."""
    original = engine_module.CausalLMLoss.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        total, count, reg = original(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] in bad_calls:
                total = total * float("nan")
        return total, count, reg

    monkeypatch.setattr(engine_module.CausalLMLoss, "forward", forward)


def test_a_nan_step_is_skipped_and_counted_and_training_continues(make_spec, tmp_path: Path, monkeypatch) -> None:
    _poison_steps(monkeypatch, {2, 3})
    result = train_spec(make_spec("lora", maxSteps=5), tmp_path / "run")
    logged = read_metrics(tmp_path / "run" / "logs", "train")
    assert result.metrics["skipped_steps"] == 2 and logged[-1]["skipped_steps"] == 2
    assert result.metrics["step"] == 5 and result.export is not None


def test_consecutive_nan_steps_stop_the_run_with_a_clear_message(make_spec, tmp_path: Path, monkeypatch) -> None:
    _poison_steps(monkeypatch, set(range(2, 100)))
    with pytest.raises(NonFiniteLossError, match="NaN/Inf for 3 consecutive steps"):
        train_spec(make_spec("lora", maxSteps=20, maxBadSteps=3), tmp_path / "run")


def test_skipped_step_leaves_the_weights_untouched(make_spec, tmp_path: Path, monkeypatch) -> None:
    from glmtune_trainer.checkpoint import load_weights

    clean = train_spec(make_spec("full", maxSteps=1, learningRate=1e-2), tmp_path / "clean")
    _poison_steps(monkeypatch, {2})
    poisoned = train_spec(make_spec("full", maxSteps=2, learningRate=1e-2), tmp_path / "poisoned")
    # Both runs' first step has the full learning rate; the poisoned run's second step must change nothing.
    a = load_weights(clean.checkpoint_dir / "model.safetensors")
    b = load_weights(poisoned.checkpoint_dir / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bleu4_and_rouge_l_score_characters_like_thudm() -> None:
    from glmtune_trainer.genmetrics import bleu4, rouge_l

    assert bleu4(list("今天天气很好"), list("今天天气很好")) == pytest.approx(1.0)
    # p1 3/4, p2 2/3, p3 1/2, no 4-gram match → smoothed 1/(2·1): (0.75·0.667·0.5·0.5)^(1/4)
    assert bleu4(list("abcx"), list("abcd")) == pytest.approx(0.125 ** 0.25)
    assert rouge_l(list("abcd"), list("abed")) == pytest.approx(0.75)
    assert bleu4([], list("abc")) == 0.0 and rouge_l(list("xyz"), list("abc")) == 0.0


def test_generation_metrics_score_what_the_trained_model_answers(make_spec, tmp_path: Path) -> None:
    import json

    from glmtune_trainer.genmetrics import generation_scores

    from glmtune.modeling import load_model
    from glmtune.templates import encode_answer, encode_prompt
    from glmtune.tokenization import load_tokenizer

    # One question and answer, 12 times: the held-out copies are questions the model has memorised.
    question, answer = "今天天气怎么样？", "今天天气很好"
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"instruction": question, "output": answer}, ensure_ascii=False) + "\n"
                            for _ in range(12)), encoding="utf-8")
    spec = make_spec("full", maxSteps=12, batchSize=4, learningRate=5e-3, warmupSteps=0, scheduler="constant",
                     data={"sources": [str(data)], "evalSplit": 0.25},
                     evaluation={"everyEpoch": True, "generationMetrics": True})
    result = train_spec(spec, tmp_path / "run")
    final = read_metrics(tmp_path / "run" / "logs", "eval")[-1]
    assert final["step"] == 12
    # Greedy decoding returns the trained answer, exactly the held-out reference.
    assert (final["bleu4"], final["rouge_l"]) == (pytest.approx(100.0), pytest.approx(100.0))

    model = load_model(result.export.uri)
    tokenizer = load_tokenizer(result.export.uri)
    prompt = encode_prompt(tokenizer, "v2", question).ids
    pairs = [(prompt, encode_answer(tokenizer, "v2", answer)), (prompt, encode_answer(tokenizer, "v2", "今天天气不好"))]
    scores = generation_scores(model, tokenizer, "v2", pairs, torch.device("cpu"))
    # By hand, 今天天气很好 against 今天天气不好 (characters): n-gram precisions 5/6, 3/5, 2/4, 1/3 and equal
    # lengths (no brevity penalty) give BLEU-4 = (1/12)^(1/4); the longest common subsequence 今天天气好 (5)
    # gives Rouge-L = 5/6. The exact pair scores 100 on both; the scores are means over pairs, x100.
    assert scores["bleu4"] == pytest.approx((100 + 100 * (1 / 12) ** 0.25) / 2)
    assert scores["rouge_l"] == pytest.approx((100 + 100 * 5 / 6) / 2)

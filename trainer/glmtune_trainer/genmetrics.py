"""Generation metrics on the held-out split: BLEU-4 and Rouge-L, as THUDM reported for p-tuning v2.

THUDM scored characters for BLEU-4 (nltk, smoothing method 3) and jieba words for Rouge-L; we score
characters for both (no segmenter dependency), so Rouge-L reads slightly higher than theirs. Greedy
answers are generated for each held-out window's prompt; every rank scores its own share.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from glmtune_trainer.distributed import all_reduce_sum


def bleu4(candidate: Sequence[str], reference: Sequence[str]) -> float:
    """Sentence BLEU-4 with NIST geometric smoothing (nltk's method3) and the brevity penalty, in [0, 1]."""
    if not candidate:
        return 0.0
    logs, zero_runs = [], 0
    for n in range(1, 5):
        grams = Counter(tuple(candidate[i : i + n]) for i in range(len(candidate) - n + 1))
        ref = Counter(tuple(reference[i : i + n]) for i in range(len(reference) - n + 1))
        total = max(sum(grams.values()), 1)
        matches = sum(min(count, ref[gram]) for gram, count in grams.items())
        if matches == 0:
            zero_runs += 1
            logs.append(math.log(1.0 / (2**zero_runs * total)))
        else:
            logs.append(math.log(matches / total))
    brevity = 1.0 if len(candidate) > len(reference) else math.exp(1 - len(reference) / len(candidate))
    return brevity * math.exp(sum(logs) / 4)


def rouge_l(candidate: Sequence[str], reference: Sequence[str]) -> float:
    """Rouge-L F1 from the longest common subsequence, in [0, 1]."""
    if not candidate or not reference:
        return 0.0
    previous = [0] * (len(reference) + 1)
    for token in candidate:
        current = [0]
        for j, ref_token in enumerate(reference):
            current.append(previous[j] + 1 if token == ref_token else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(candidate), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


def prompts_and_answers(records: Iterable[Any]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reference answer ids) of every window with a real prompt (not an answer continuation)."""
    pairs = []
    for record in records:
        for start, length, untrained, _, _ in record.segments.tolist():
            if untrained > 2:
                ids = record.input_ids[start : start + length].tolist()
                pairs.append((ids[:untrained], ids[untrained:]))
    return pairs


def generation_scores(model: torch.nn.Module, tokenizer: Any, template: str, pairs: list[tuple[list[int], list[int]]],
                      device: torch.device, max_new_tokens: int = 128) -> dict[str, float]:
    """Mean BLEU-4 and Rouge-L (×100) over all ranks' shares of `pairs` (each rank passes its own)."""
    from glmtune.templates import decode_answer, stop_token_ids

    was_training = model.training
    model.eval()
    bleu = rouge = 0.0
    with torch.no_grad():
        for prompt, answer in pairs:
            inputs = torch.tensor([prompt], device=device)
            out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), do_sample=False,
                                 max_new_tokens=min(max_new_tokens, len(answer) + 16),
                                 eos_token_id=stop_token_ids(tokenizer, template))
            predicted = list(decode_answer(tokenizer, template, out[0, len(prompt):].tolist()))
            reference = list(decode_answer(tokenizer, template, answer))
            bleu += bleu4(predicted, reference)
            rouge += rouge_l(predicted, reference)
    model.train(was_training)
    count = all_reduce_sum(float(len(pairs)), device)
    bleu, rouge = all_reduce_sum(bleu, device), all_reduce_sum(rouge, device)
    return {"bleu4": 100 * bleu / count, "rouge_l": 100 * rouge / count} if count else {}

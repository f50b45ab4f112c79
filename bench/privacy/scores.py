"""How much of a text an attack recovered: token accuracy (position by position; tokens the attacker never saw
count as wrong), corpus BLEU-4 (clipped 1-4-gram precisions, geometric mean) and token set recall (a bag of
words). Sequences are lists of token ids; -1 marks a position the attacker never saw.
"""

import math
from collections import Counter

import torch

__all__ = ["token_accuracy", "bleu", "token_set_recall", "scores"]


def token_accuracy(recovered: list[list[int]], true: list[list[int]]) -> float:
    """Fraction of positions where the recovered token is the true one."""
    hits = sum(r == t for rs, ts in zip(recovered, true, strict=True) for r, t in zip(rs, ts, strict=True))
    return hits / sum(len(ts) for ts in true)


def bleu(recovered: list[list[int]], true: list[list[int]], max_n: int = 4) -> tuple[float, list[float]]:
    """Corpus BLEU of recovered against true sequences (equal lengths: no brevity penalty) and its clipped
    n-gram precisions, n = 1..max_n. Unseen positions (-1) match nothing."""
    precisions = []
    for n in range(1, max_n + 1):
        matched = total = 0
        for rs, ts in zip(recovered, true, strict=True):
            grams = Counter(tuple(rs[i:i + n]) for i in range(len(rs) - n + 1) if -1 not in rs[i:i + n])
            truth = Counter(tuple(ts[i:i + n]) for i in range(len(ts) - n + 1))
            matched += sum(min(c, truth[g]) for g, c in grams.items())
            total += max(0, len(rs) - n + 1)
        precisions.append(matched / total if total else 0.0)
    score = math.exp(sum(math.log(p) for p in precisions) / max_n) if min(precisions) > 0 else 0.0
    return score, precisions


def token_set_recall(recovered: list[list[int]], true: list[list[int]]) -> float:
    """Per sequence, the fraction of its distinct tokens found anywhere in the recovered one (a bag of words,
    order ignored); averaged over sequences."""
    return sum(len(set(r) & set(t)) / len(set(t)) for r, t in zip(recovered, true, strict=True)) / len(true)


def scores(recovered: torch.Tensor, true: torch.Tensor) -> dict:
    """Every score of a recovery against the truth (both [sequences, length])."""
    rec, tru = recovered.tolist(), true.tolist()
    score, precisions = bleu(rec, tru)
    return {"token_accuracy": token_accuracy(rec, tru), "bleu4": score, "ngram_precisions": precisions,
            "token_set_recall": token_set_recall(rec, tru)}

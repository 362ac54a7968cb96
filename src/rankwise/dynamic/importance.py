"""AdaLoRA's importance scores as pure tensor functions (no model, no state): the stepper composes them.

For every entry w of P (lora_A), lambda (lora_E) and Q (lora_B):
    sensitivity  I = |w * dL/dw|
    smoothed     Ibar <- beta1 * Ibar + (1 - beta1) * I
    uncertainty  U    <- beta2 * U + (1 - beta2) * |I - Ibar|        (with the Ibar just updated, as peft does)
    score        s = Ibar * U
A triplet (P row i, lambda_i, Q column i) scores s(lambda_i) + mean_j s(P_ij) + mean_o s(Q_oi).
Masking keeps the best-scoring triplets that fit a budget: a count of triplets (`ranks`, the method's own unit) or
trainable parameters (`params`: a triplet of an [out, in] layer costs in + out + 1). In parameters a triplet of a
wide layer that no longer fits would otherwise end the keep with up to its whole cost unspent (1,921 of a 9,216
budget on MiniLM): `select` goes on down the order, keeps each cheaper triplet that still fits, and trades a
kept wide triplet for cheaper ones while that spends more.
"""

from __future__ import annotations

import torch

__all__ = ["importance", "ema_update", "element_scores", "triplet_scores", "threshold", "mask", "select"]


def importance(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Sensitivity |theta * grad| of every entry."""
    return (param.detach() * grad).abs_()


def ema_update(avg_ipt: torch.Tensor, avg_unc: torch.Tensor, ipt: torch.Tensor, beta1: float, beta2: float) -> None:
    """Update the smoothed sensitivity and the uncertainty in place (peft's order: uncertainty uses the new mean)."""
    avg_ipt.mul_(beta1).add_(ipt, alpha=1 - beta1)
    avg_unc.mul_(beta2).add_((ipt - avg_ipt).abs_(), alpha=1 - beta2)


def element_scores(avg_ipt: torch.Tensor, avg_unc: torch.Tensor) -> torch.Tensor:
    return avg_ipt * avg_unc


def triplet_scores(scores: torch.Tensor, segment: torch.Tensor, weight: torch.Tensor, n_triplets: int) -> torch.Tensor:
    """Per-triplet sums of `scores * weight` over a flat layout: `segment[k]` is the triplet entry k belongs to,
    `weight[k]` 1 for lambda, 1/in for a P entry and 1/out for a Q entry (so the sums are the means)."""
    return torch.zeros(n_triplets, dtype=scores.dtype, device=scores.device).index_add_(0, segment, scores * weight)


def threshold(scores: torch.Tensor, budget: int, costs: torch.Tensor | None = None) -> float:
    """The largest score that is pruned: keeping `scores > threshold` spends at most `budget`.

    costs None (unit ranks): peft's rule, the (n - budget)-th smallest score. With costs (unit params): the
    best-scoring triplets are kept in order while their cumulative cost fits the budget; the first one that does
    not fit sets the threshold (ties with it are pruned too, so the budget is never exceeded). -inf keeps all."""
    n = scores.numel()
    if costs is None:
        k = n - int(budget)
        if k <= 0:
            return float("-inf")
        return float(torch.kthvalue(scores.float().cpu(), k).values) if k <= n else float("inf")
    order = torch.argsort(scores, descending=True, stable=True)
    fits = int((torch.cumsum(costs[order], 0) <= budget).sum())
    return float("-inf") if fits == n else float(scores[order[fits]])


def mask(scores: torch.Tensor, thresh: float) -> torch.Tensor:
    """Triplets to keep: those scoring above the threshold (peft prunes `score <= threshold`)."""
    return scores > thresh


def select(scores: torch.Tensor, budget: int, costs: torch.Tensor | None = None, fill: bool = True) -> torch.Tensor:
    """Triplets to keep within `budget`. Unit ranks (costs None) or fill=False: `mask(threshold(...))`. With costs
    and fill: best-scoring first, every triplet that still fits in what is left (greedy, so a wide triplet that no
    longer fits does not stop cheaper ones after it); then, while it spends more, the lowest-scoring kept triplet
    of a cost class is given back for the next best that fit (1,920 back, three of 768 in: what a budget of
    a few ranks needs). Never over the budget; ties keep the lower index."""
    if costs is None or not fill:
        return mask(scores, threshold(scores, budget, costs))
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    cost = costs.tolist()
    cheapest = min(cost, default=0)
    kept, left = _greedy(order, cost, cheapest, int(budget), set())
    for _ in range(8):
        trials = []
        for c in {cost[i] for i in kept if cost[i] > left}:
            back = next(i for i in reversed(order) if i in kept and cost[i] == c)
            for below in (float("inf"), c):  # refill with any triplet, or only cheaper ones (not wide for wide)
                trial, rest = _greedy(order, cost, cheapest, left + c, kept - {back}, skip=back, below=below)
                trials.append((rest, trial))
        best = min(trials, key=lambda t: t[0], default=None)
        if best is None or best[0] >= left:
            break
        left, kept = best
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if kept:
        keep[torch.tensor(sorted(kept), device=scores.device)] = True
    return keep


def _greedy(order: list[int], cost: list, cheapest: int, left: int, kept: set, skip: int = -1,
            below: float = float("inf")) -> tuple[set, int]:
    """Walk `order` adding every triplet not yet kept whose cost fits what is left (and is under `below`);
    (kept, what is left). `cheapest` (the smallest cost) ends the walk once nothing more can fit."""
    kept = set(kept)
    for i in order:
        if left < cheapest:
            break
        if i not in kept and i != skip and cost[i] <= left and cost[i] < below:
            kept.add(i)
            left -= cost[i]
    return kept, left

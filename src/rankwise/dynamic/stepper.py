"""The one stateful piece: importance EMAs and masks of every triplet of every layer, updated once per optimizer step.

All layers live in flat tensors laid out once at construction (P entries of every layer, then lambda, then Q), so a
step is a handful of vectorised tensor operations whatever the number of layers: two `cat`s of the parameters and
their gradients, the EMA updates, one `index_add_` for the triplet scores, one selection, one fused multiply of the
lambdas by the mask. No walk over the model's modules or parameter names after construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..types import RankwiseError
from .importance import element_scores, ema_update, importance, select, triplet_scores
from .schedule import Schedule, budget_schedule

__all__ = ["Slot", "Stepper", "UNITS"]

# params: a triplet costs in + out + 1 (P row, Q column, lambda); lora_params: in + out, what the exported plain LoRA
# adapter holds (lambda folds into B), the currency a study compares adapters in; ranks: peft's count of triplets.
UNITS = ("params", "lora_params", "ranks")


@dataclass
class Slot:
    """One adapted layer: its fully qualified name and its P (r, in), lambda (r, 1), Q (out, r) parameters."""

    name: str
    A: torch.nn.Parameter
    E: torch.nn.Parameter
    B: torch.nn.Parameter

    @property
    def rank(self) -> int:
        return int(self.E.shape[0])

    @property
    def triplet_cost(self) -> int:
        return int(self.A.shape[1] + self.B.shape[0] + 1)


class Stepper:
    """AdaLoRA's RankAllocator, vectorised over layers, with budgets in triplets (`ranks`) or parameters."""

    def __init__(self, slots: list[Slot], *, target: int, unit: str = "params", beta1: float = 0.85,
                 beta2: float = 0.85, fill: bool = True):
        if unit not in UNITS:
            raise RankwiseError(f"adalora unit must be one of {', '.join(UNITS)}, got {unit!r}")
        if not slots:
            raise RankwiseError("adalora found no layer to adapt")
        self.slots, self.unit, self.beta1, self.beta2, self.fill = slots, unit, beta1, beta2, fill
        self.names = [s.name for s in slots]
        self._E = [s.E for s in slots]
        self._params = [s.A for s in slots] + self._E + [s.B for s in slots]
        dev = slots[0].E.device
        ranks = torch.tensor([s.rank for s in slots], device=dev)
        self.n = int(ranks.sum())
        self._offsets = torch.cumsum(ranks, 0) - ranks
        self._layer_of = torch.repeat_interleave(torch.arange(len(slots), device=dev), ranks)
        self._segment, self._weight = self._layout(dev)
        per_triplet = torch.tensor([s.triplet_cost for s in slots], device=dev)[self._layer_of]
        self.cost_of = per_triplet  # parameters per triplet, whatever the unit (for reporting)
        self.costs = self._unit_costs()
        self.init_budget = self.n if self.costs is None else int(self.costs.sum())
        self.target = int(target)
        if not 0 < self.target <= self.init_budget:
            raise RankwiseError(f"adalora target budget {self.target:,} {unit} must be in (0, {self.init_budget:,}] "
                                f"(the initial budget: every layer at init_rank); raise init_rank or lower the budget")
        self.avg_ipt = torch.zeros(self._segment.numel(), device=dev)
        self.avg_unc = torch.zeros_like(self.avg_ipt)
        self.scores = torch.zeros(self.n, device=dev)
        self.keep = torch.ones(self.n, dtype=torch.bool, device=dev)
        self._keep_f = torch.ones(self.n, device=dev, dtype=slots[0].E.dtype)
        # views of the mask buffer, one (r, 1) per lambda: updating the buffer in place updates them all
        self._keep_views = [v.view(-1, 1) for v in self._keep_f.split([s.rank for s in slots])]
        self.schedule: Schedule | None = None
        self.steps_run = 0
        self.last_step = 0
        self.finalized = False
        self.history: list[tuple[int, list[int]]] = [(0, self.layer_ranks())]

    def _layout(self, dev) -> tuple[torch.Tensor, torch.Tensor]:
        """Triplet index and averaging weight of every flat entry, in `_params` order (all P, all lambda, all Q)."""
        seg, wts = [], []
        for s, off in zip(self.slots, self._offsets.tolist()):  # P (r, in), row-major: entry k is row k // in
            r, fan_in = s.A.shape
            seg.append(off + torch.arange(r, device=dev).repeat_interleave(fan_in))
            wts.append(torch.full((r * fan_in,), 1.0 / fan_in, device=dev))
        for s, off in zip(self.slots, self._offsets.tolist()):
            seg.append(off + torch.arange(s.rank, device=dev))
            wts.append(torch.ones(s.rank, device=dev))
        for s, off in zip(self.slots, self._offsets.tolist()):  # Q (out, r), row-major: entry k is column k % r
            fan_out, r = s.B.shape
            seg.append(off + torch.arange(r, device=dev).repeat(fan_out))
            wts.append(torch.full((fan_out * r,), 1.0 / fan_out, device=dev))
        return torch.cat(seg), torch.cat(wts)

    def bind(self, schedule: Schedule) -> None:
        if self.steps_run:
            raise RankwiseError("adalora's schedule cannot change once allocation has started")
        self.schedule = schedule

    # ---------------------------------------------------------------- the step

    @torch.no_grad()
    def step(self, step: int) -> None:
        """Run after the optimizer step `step` (1-based) and before gradients are zeroed."""
        s = self.schedule
        if s is None:
            raise RankwiseError("adalora's allocator has no schedule; call Method.callbacks() before training")
        self._follow_device()
        self.steps_run += 1
        self.last_step = step
        if step < s.final_step:
            self._update_importance()
        budget, now = budget_schedule(step, self.init_budget, self.target, s)
        if self.finalized:
            torch._foreach_mul_(self._E, self._keep_views)  # the optimizer may revive pruned lambdas
        elif now:
            self._allocate(budget, step)
            self.finalized = step >= s.final_step

    def _follow_device(self) -> None:
        """The Trainer moves the model (to the GPU) after build: move the flat state along, once."""
        dev = self._E[0].device
        if self._segment.device == dev:
            return
        for k in ("_offsets", "_layer_of", "_segment", "_weight", "cost_of", "avg_ipt", "avg_unc", "scores", "keep",
                  "_keep_f"):
            setattr(self, k, getattr(self, k).to(dev))
        self.costs = self._unit_costs()
        self._keep_views = [v.view(-1, 1) for v in self._keep_f.split([s.rank for s in self.slots])]

    def _unit_costs(self) -> torch.Tensor | None:
        return {"params": self.cost_of, "lora_params": self.cost_of - 1}.get(self.unit)

    def _update_importance(self) -> None:
        grads = [p.grad for p in self._params]
        if any(g is None for g in grads):
            raise RankwiseError("adalora's allocation step ran without gradients: it must run after the optimizer "
                                "step and before zero_grad (Trainer's on_optimizer_step), not at on_step_end")
        theta = torch.cat([p.reshape(-1) for p in self._params])
        grad = torch.cat([g.reshape(-1) for g in grads])
        ema_update(self.avg_ipt, self.avg_unc, importance(theta, grad), self.beta1, self.beta2)

    def _allocate(self, budget: int, step: int) -> None:
        self.scores = triplet_scores(element_scores(self.avg_ipt, self.avg_unc), self._segment, self._weight, self.n)
        keep = select(self.scores, budget, self.costs, self.fill)
        self.keep = _same_on_every_process(keep)
        self._keep_f.copy_(self.keep)
        torch._foreach_mul_(self._E, self._keep_views)
        self.history.append((step, self.layer_ranks()))

    # ---------------------------------------------------------------- results

    def layer_ranks(self) -> list[int]:
        counts = torch.zeros(len(self.slots), device=self.keep.device)
        return [int(c) for c in counts.index_add_(0, self._layer_of, self.keep.to(counts.dtype)).tolist()]

    def ranks(self) -> dict[str, int]:
        return dict(zip(self.names, self.layer_ranks()))

    def kept_params(self) -> int:
        """Trainable parameters of the kept triplets (in + out + 1 each)."""
        return int(self.cost_of[self.keep].sum())

    def peak_params(self) -> int:
        return int(self.cost_of.sum())

    def rank_pattern(self) -> dict[str, list[bool]]:
        """peft AdaLoraConfig.rank_pattern: {"<module>.lora_E": [kept?] * init_rank} (what save_pretrained prunes)."""
        pattern, keep = {}, self.keep.tolist()
        for s, off in zip(self.slots, self._offsets.tolist()):
            pattern[f"{s.name}.lora_E"] = keep[off:off + s.rank]
        return pattern


def _same_on_every_process(keep: torch.Tensor) -> torch.Tensor:
    """Under DDP every process computed the mask from the same all-reduced gradients; broadcasting rank 0's copy
    makes them bit-identical even where non-deterministic kernels would break a tie differently."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return keep
    buf = keep.to(torch.uint8)
    dist.broadcast(buf, src=0)
    return buf.bool()

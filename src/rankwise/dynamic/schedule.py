"""AdaLoRA's budget schedule: warm-up at the initial budget, pruning down to the target, a final phase at the target.

Steps are counted 1..total_step: step s is the s-th optimizer step, seen right after it (before zero_grad).

    s <= tinit                      warm-up: importance accumulates, nothing is pruned
    tinit < s < total - tfinal      pruning: the budget falls (cubic by default) from the initial to the target
                                    budget; triplets are masked every deltaT steps
    s == total - tfinal             the final allocation at the target budget (always runs)
    s > total - tfinal              final phase: the ranks are frozen, the final mask is re-applied every step

Defaults follow the authors' GLUE scripts (QingruZhang/AdaLoRA, NLU/scripts: RTE 600/1800 of 3,900 steps, CoLA
800/3,500 of 6,700, SST-2 6,000/22,000 of 50,500, MNLI 8,000/50,000 of 86,000; mask_interval 1-100): warm-up ~10%
of training, final phase ~40%, so the budget falls over roughly the middle of training, and an allocation about
every 1/500 of the run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..types import RankwiseError

__all__ = ["Schedule", "SHAPES", "default_schedule", "budget_schedule", "phase"]

SHAPES = ("cubic", "linear")
_TINIT_SHARE, _TFINAL_SHARE, _ALLOCATIONS = 0.10, 0.40, 500


@dataclass(frozen=True)
class Schedule:
    total_step: int
    tinit: int
    tfinal: int
    deltaT: int
    shape: str = "cubic"

    def __post_init__(self):
        validate(self)

    @property
    def final_step(self) -> int:
        """The step of the final allocation (at the target budget); ranks are frozen after it."""
        return self.total_step - self.tfinal

    def to_dict(self) -> dict:
        return asdict(self)


def validate(s: Schedule) -> None:
    """The method's own rules, each a one-line error."""
    if not isinstance(s.total_step, int) or s.total_step <= 0:
        raise RankwiseError(f"adalora needs the number of optimizer steps (total_step) known and positive, got "
                            f"{s.total_step!r}; give --max-steps or --epochs with a non-empty training set")
    if s.tinit < 0 or s.tfinal < 0:
        raise RankwiseError(f"adalora tinit and tfinal must be >= 0, got tinit={s.tinit}, tfinal={s.tfinal}")
    if not s.tinit < s.total_step - s.tfinal:
        raise RankwiseError(f"adalora needs tinit < total_step - tfinal (a pruning phase), got tinit={s.tinit}, "
                            f"tfinal={s.tfinal}, total_step={s.total_step}; lower tinit/tfinal or train longer")
    if s.deltaT < 1:
        raise RankwiseError(f"adalora deltaT (steps between allocations) must be >= 1, got {s.deltaT}")
    if s.shape not in SHAPES:
        raise RankwiseError(f"adalora schedule must be one of {', '.join(SHAPES)}, got {s.shape!r}")


def default_schedule(total_step: int, *, tinit: int | None = None, tfinal: int | None = None,
                     deltaT: int | None = None, shape: str = "cubic") -> Schedule:
    """The authors' proportions for any run length; explicit values win. Always valid for total_step >= 1
    when nothing is given explicitly."""
    if not isinstance(total_step, int) or total_step <= 0:
        raise RankwiseError(f"adalora needs the number of optimizer steps (total_step) known and positive, got "
                            f"{total_step!r}; give --max-steps or --epochs with a non-empty training set")
    if tinit is None:
        tinit = int(_TINIT_SHARE * total_step)
    if tfinal is None:
        tfinal = min(int(round(_TFINAL_SHARE * total_step)), max(0, total_step - tinit - 1))
    if deltaT is None:
        deltaT = max(1, round(total_step / _ALLOCATIONS))
    return Schedule(total_step, tinit, tfinal, deltaT, shape)


def phase(step: int, s: Schedule) -> str:
    if step <= s.tinit:
        return "warmup"
    return "pruning" if step < s.final_step else "final"


def budget_schedule(step: int, init_budget: int, target_budget: int, s: Schedule) -> tuple[int, bool]:
    """(budget at this step, whether to mask now): peft's RankAllocator.budget_schedule, plus a linear shape and
    the final allocation forced at `final_step` (peft forces it in update_and_allocate)."""
    if step <= s.tinit:
        return init_budget, False
    if step >= s.final_step:
        return target_budget, step == s.final_step
    left = 1 - (step - s.tinit) / (s.final_step - s.tinit)
    budget = int((init_budget - target_budget) * left ** (3 if s.shape == "cubic" else 1) + target_budget)
    return budget, step % s.deltaT == 0

"""The data-driven allocators on crafted stats: every expected rank below is computed by hand from the formula in
docs/strategies.md (exact budgets are covered for every allocator by test_allocators.py's property test)."""

from __future__ import annotations

import pytest

from rankwise.allocators import allocate
from rankwise.allocators.data import eva_counts, is_data_driven
from rankwise.types import Budget, LayerInfo, LayerStats, RankwiseError


def layer(name, out_f, in_f, **metrics):
    return LayerStats(LayerInfo(name, out_f, in_f), dict(metrics))


def acts(eff=1.0, in2=1.0, out2=1.0):
    return {"act_effective_rank": eff, "act_in_norm2": in2, "act_out_norm2": out2}


def test_activation_effective_rank_direction():
    # rank = lam * eff with 128 * (10 + 20 + 40) * lam = 1792 -> lam = 0.2 -> ranks 2, 4, 8
    stats = [layer(f"l{i}", 64, 64, **acts(eff=e)) for i, e in enumerate((10.0, 20.0, 40.0))]
    a = allocate("activation", stats, Budget(1792))
    assert dict(a.pattern.ranks) == {"l0": 2, "l1": 4, "l2": 8} and a.spent == 1792


def test_activation_norm_signals_use_rms():
    # input_norm: sqrt(1), sqrt(4), sqrt(16) = 1, 2, 4 -> lam = 2 with budget 128 * 14 -> ranks 2, 4, 8
    stats = [layer(f"l{i}", 64, 64, **acts(in2=v, out2=1.0 / v)) for i, v in enumerate((1.0, 4.0, 16.0))]
    assert dict(allocate("activation", stats, Budget(1792), signal="input_norm").pattern.ranks) == \
        {"l0": 2, "l1": 4, "l2": 8}
    # output_norm reverses the order: 1, 1/2, 1/4 -> ranks 8, 4, 2
    assert dict(allocate("activation", stats, Budget(1792), signal="output_norm").pattern.ranks) == \
        {"l0": 8, "l1": 4, "l2": 2}
    with pytest.raises(RankwiseError, match="signal must be one of"):
        allocate("activation", stats, Budget(1792), signal="bogus")


def test_gradient_goRA_share_of_parameters():
    # A 64x64 (cost 128, 4096 entries), B 192x64 (cost 256, 12288 entries), both mean |W*G| = 1
    # -> shares 1/2, 1/2 of 2048 parameters -> A: 1024 / 128 = 8, B: 1024 / 256 = 4
    stats = [layer("A", 64, 64, grad_sensitivity=4096.0, grad_norm=1.0),
             layer("B", 192, 64, grad_sensitivity=12288.0, grad_norm=1.0)]
    a = allocate("gradient", stats, Budget(2048))
    assert dict(a.pattern.ranks) == {"A": 8, "B": 4}
    assert a.pattern.scores == {"A": 0.5, "B": 0.5}
    # importance=sensitivity (the sum): shares 1/4, 3/4 -> A: 512 / 128 = 4, B: 1536 / 256 = 6
    assert dict(allocate("gradient", stats, Budget(2048), importance="sensitivity").pattern.ranks) == \
        {"A": 4, "B": 6}


def test_gradient_higher_importance_higher_rank_same_shape():
    stats = [layer(f"l{i}", 64, 64, grad_sensitivity=s, grad_norm=1.0) for i, s in enumerate((1.0, 3.0))]
    # shares 1/4, 3/4 of 1024 -> 256 / 128 = 2 and 768 / 128 = 6
    assert dict(allocate("gradient", stats, Budget(1024)).pattern.ranks) == {"l0": 2, "l1": 6}
    zero = [layer(f"l{i}", 64, 64, grad_sensitivity=0.0, grad_norm=0.0) for i in range(2)]
    with pytest.raises(RankwiseError, match="importance is 0"):
        allocate("gradient", zero, Budget(1024))


def evr(*shares):
    return {f"act_evr_{i + 1}": v for i, v in enumerate(shares)}


def test_eva_takes_the_largest_shares_globally():
    # both start at rank 1 (A1=.5, B1=.3); 4 more directions of equal cost 128 fit in 768:
    # B2 .28 > A2 .20 = B3 .20 (tie: A first) > B4 .12 > A3 .10 -> A: 2, B: 4
    stats = [layer("A", 64, 64, **evr(0.5, 0.2, 0.1, 0.05)), layer("B", 64, 64, **evr(0.3, 0.28, 0.2, 0.12))]
    assert eva_counts(stats, Budget(768), rho=10) == [2, 4]
    assert dict(allocate("eva", stats, Budget(768), rho=10.0).pattern.ranks) == {"A": 2, "B": 4}


def test_eva_prices_directions_in_parameters():
    # A 64x64 costs 128 per direction, B 448x64 costs 512. After the minimum (640) 384 are left:
    # B2 (.35) does not fit, A2 .3, A3 .2, A4 .1 (3 x 128 = 384) do -> A: 4, B: 1.
    # A rank-sum budget (peft EVA) would have taken B2 first.
    stats = [layer("A", 64, 64, **evr(0.4, 0.3, 0.2, 0.1)), layer("B", 448, 64, **evr(0.5, 0.35, 0.1, 0.05))]
    assert eva_counts(stats, Budget(1024), rho=10) == [4, 1]
    assert dict(allocate("eva", stats, Budget(1024), rho=10.0).pattern.ranks) == {"A": 4, "B": 1}


def test_eva_rho_caps_and_unstored_directions():
    # uniform rank of 128 * 8 over two layers is 4; rho=1.5 caps each at ceil(6) = 6 directions
    stats = [layer("A", 64, 64, **evr(0.9, 0.05)), layer("B", 64, 64, **evr(0.2, 0.2))]
    # A's unstored directions share (1 - .95) / 62 each, B's (1 - .4) / 62 (capped at .2): B wins them all
    assert eva_counts(stats, Budget(1024), rho=1.5) == [2, 6]


def test_data_driven_registry_flags():
    assert all(is_data_driven(s) for s in ("activation", "gradient", "eva"))
    assert not any(is_data_driven(s) for s in ("uniform", "spectral", "weight_norm", "depth"))

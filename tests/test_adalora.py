"""AdaLoRA (`--method adalora`): config rules, layer, allocator pieces against hand computations and peft's own
RankAllocator, full Trainer runs, save/reload with rank-0 layers, exact export, loud failures, DDP masks."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rankwise.dynamic import (Schedule, Stepper, budget_schedule, default_schedule, ema_update, importance, mask,
                              select, threshold, triplet_scores)
from rankwise.dynamic.method import AdaLoraMethod, adalora_to_plain, default_init_rank
from rankwise.methods import MethodContext, get_method
from rankwise.types import RankwiseError
from test_training_fixtures import sentences, tiny_bert_dir, tiny_llama_dir, write_csv  # noqa: F401

METHOD = AdaLoraMethod()
IDS = torch.tensor([[1, 5, 9, 13, 2, 7], [3, 3, 8, 1, 0, 4]])


def _tiny_cls(num_labels=2):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                     vocab_size=100, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(cfg)


def _ctx(options=None, total=None, **choice):
    return MethodContext(task="seq-cls", model_name="tiny", model_path="tiny",
                         lora_kwargs={"task_type": "SEQ_CLS", "modules_to_save": ["classifier"], "lora_dropout": 0.0},
                         choice=choice, options=dict(options or {}), progress=False, total_steps=total)


def _randomise(built, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in built.state["stepper"].slots:
            for p in (s.A, s.E, s.B):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize("options, match", [
    ({"speed": 1}, "unknown adalora option"),
    ({"tinit": 1.5}, "tinit must be an integer"),
    ({"beta1": 1.0}, "beta1 must be in"),
    ({"beta2": "x"}, "beta2 must be a number"),
    ({"orth_reg_weight": -0.1}, "orth_reg_weight must be >= 0"),
    ({"deltaT": 0}, "deltaT must be >= 1"),
    ({"unit": "bits"}, "unit must be one of"),
    ({"schedule": "quadratic"}, "schedule must be one of"),
    ({"init_rank": 0}, "init_rank must be >= 1"),
    ({"fill": "yes"}, "fill must be true or false"),
    ({"unit": "lora"}, "unit must be one of params, lora_params, ranks"),
])
def test_bad_options_are_one_line_errors(options, match):
    with pytest.raises(RankwiseError, match=match) as e:
        METHOD.check(options, {})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("choice, options, match", [
    ({"strategy": "spectral"}, {}, "not --strategy"),
    ({"preset": "balanced"}, {}, "not --preset"),
    ({"budget": "10k", "budget_rank": 4}, {}, "not both"),
    ({"budget": "10k"}, {"unit": "ranks"}, "give --budget-rank"),
    ({"budget_rank": 4}, {"init_rank": 3}, r"init_rank \(3\) must be >= the target rank"),
])
def test_bad_choices_are_one_line_errors(choice, options, match):
    with pytest.raises(RankwiseError, match=match):
        METHOD.check(options, choice)


def test_schedule_rules_and_defaults():
    with pytest.raises(RankwiseError, match="total_step"):
        default_schedule(None)
    with pytest.raises(RankwiseError, match="total_step"):
        default_schedule(0)
    with pytest.raises(RankwiseError, match="tinit < total_step - tfinal"):
        default_schedule(10, tinit=5, tfinal=5)
    with pytest.raises(RankwiseError, match="deltaT"):
        Schedule(10, 1, 1, 0)
    for total in range(1, 60):  # the defaults always leave a pruning phase
        s = default_schedule(total)
        assert s.tinit < s.total_step - s.tfinal
    s = default_schedule(1000)  # the authors' proportions: ~10% warm-up, ~40% final phase, 1/500 allocations
    assert (s.tinit, s.tfinal, s.deltaT) == (100, 400, 2)


def test_build_rejects_an_init_rank_above_the_layer_and_a_budget_above_init():
    with pytest.raises(RankwiseError, match="exceeds min"):
        METHOD.build(_tiny_cls(), _ctx({"init_rank": 40}, budget_rank=2))
    with pytest.raises(RankwiseError, match="target budget"):
        METHOD.build(_tiny_cls(), _ctx({"init_rank": 2}, budget="1M"))
    built = METHOD.build(_tiny_cls(), _ctx(budget_rank=2))
    with pytest.raises(RankwiseError, match="total_step"):
        METHOD.callbacks(built, _ctx(total=None))


def test_default_init_rank_is_twice_the_target_as_in_the_authors_scripts():
    # run_debertav3_*.sh: target_rank 1, lora_r 2 (six of eight GLUE tasks); below rank 1 at least rank 1
    assert [default_init_rank(t) for t in (1, 2, 4, 8, 3.99, 0.22)] == [2, 4, 8, 16, 8, 1]


def test_defaults_follow_the_authors_glue_scripts():
    # reg_orth_coef 0.1 and lora_alpha / lora_r = 32 / 2 (STS-B, RTE, MRPC, QNLI scripts)
    built = METHOD.build(_tiny_cls(), _ctx({}, budget_rank=2))
    config = built.model.peft_config["default"]
    assert config.init_r == 4 and config.lora_alpha == 64.0 and built.state["regulariser"].weight == 0.1


# ---------------------------------------------------------------- layer


def test_svd_init_forward_with_lambda_and_delta_weight():
    base = _tiny_cls()
    ref = _tiny_cls()
    built = METHOD.build(base, _ctx(budget_rank=2))
    model = built.model.eval()
    # SVD-style init: lambda = 0, so the adapted model is the base model
    assert all(float(s.E.detach().abs().max()) == 0 and float(s.A.detach().abs().max()) > 0
               for s in built.state["stepper"].slots)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=IDS).logits, ref.eval()(input_ids=IDS).logits, atol=0)
    _randomise(built)
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    s = built.state["stepper"].slots[0]
    init_r, alpha = s.rank, built.info["lora_alpha"]
    x = torch.randn(3, 32)
    w, b = layer.base_layer.weight, layer.base_layer.bias
    with torch.no_grad():
        by_hand = x @ w.T + b + sum((x @ s.A[i])[:, None] * s.E[i, 0] * s.B[:, i][None, :]
                                    for i in range(init_r)) * alpha / init_r
        assert torch.allclose(layer(x), by_hand, atol=1e-4)
        delta = layer.get_delta_weight("default")
        assert torch.allclose(delta, s.B @ torch.diag(s.E[:, 0]) @ s.A * alpha / init_r, rtol=1e-4, atol=1e-6)


def test_mask_zeroes_pruned_lambdas_and_counts_ranks():
    built = METHOD.build(_tiny_cls(), _ctx({"unit": "ranks", "tinit": 1, "tfinal": 1}, budget_rank=2))
    _randomise(built)
    st = built.state["stepper"]
    st.bind(Schedule(3, 1, 1, 1))
    grads = {}
    for i, s in enumerate(st.slots):
        for p in (s.A, s.E, s.B):
            p.grad = torch.zeros_like(p) if i == 2 else torch.rand(p.shape) + 0.1  # layer 2: no importance
            grads[id(p)] = p.grad
    st.step(1)
    st.step(2)  # final allocation: 2 triplets per layer on average, layer 2's are the least important
    ranks = st.layer_ranks()
    assert ranks[2] == 0 and sum(ranks) == 2 * len(st.slots)
    for s, r in zip(st.slots, ranks):
        assert int((s.E != 0).sum()) == r


# ---------------------------------------------------------------- allocator pieces


def test_importance_and_ema_by_hand():
    p, g = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([-0.5, 0.25, 4.0])
    ipt = importance(p, g)
    assert ipt.tolist() == [0.5, 0.5, 2.0]
    avg, unc = torch.zeros(3), torch.zeros(3)
    ema_update(avg, unc, ipt, 0.8, 0.5)
    ema_update(avg, unc, torch.tensor([1.0, 0.0, 2.0]), 0.8, 0.5)
    a1 = [0.2 * v for v in (0.5, 0.5, 2.0)]
    u1 = [0.5 * abs(v - m) for v, m in zip((0.5, 0.5, 2.0), a1)]
    a2 = [0.8 * m + 0.2 * v for m, v in zip(a1, (1.0, 0.0, 2.0))]
    u2 = [0.5 * u + 0.5 * abs(v - m) for u, v, m in zip(u1, (1.0, 0.0, 2.0), a2)]
    assert torch.allclose(avg, torch.tensor(a2)) and torch.allclose(unc, torch.tensor(u2))


def test_triplet_scores_are_lambda_plus_row_and_column_means():
    torch.manual_seed(0)
    a1, e1, b1 = torch.rand(2, 3), torch.rand(2, 1), torch.rand(4, 2)
    a2, e2, b2 = torch.rand(3, 5), torch.rand(3, 1), torch.rand(2, 3)

    def param(t):
        return torch.nn.Parameter(t.clone())

    from rankwise.dynamic import Slot

    st = Stepper([Slot("l1", param(a1), param(e1), param(b1)), Slot("l2", param(a2), param(e2), param(b2))],
                 target=3, unit="ranks")
    flat = torch.cat([a1.reshape(-1), a2.reshape(-1), e1.reshape(-1), e2.reshape(-1), b1.reshape(-1), b2.reshape(-1)])
    got = triplet_scores(flat, st._segment, st._weight, st.n)
    want = [float(e1[i, 0] + a1[i].mean() + b1[:, i].mean()) for i in range(2)]
    want += [float(e2[i, 0] + a2[i].mean() + b2[:, i].mean()) for i in range(3)]
    assert torch.allclose(got, torch.tensor(want), atol=1e-6)


def test_budget_schedule_warmup_middle_final():
    s = Schedule(total_step=20, tinit=4, tfinal=6, deltaT=3)
    assert budget_schedule(4, 100, 40, s) == (100, False)  # warm-up: the initial budget, no mask
    # middle: step 9 of the pruning window 4..14 -> (1 - 5/10)^3 of the way back up
    assert budget_schedule(9, 100, 40, s) == (int(60 * 0.5 ** 3 + 40), True)
    assert budget_schedule(8, 100, 40, s)[1] is False  # masks only every deltaT steps
    lin = Schedule(20, 4, 6, 3, "linear")
    assert budget_schedule(9, 100, 40, lin) == (70, True)
    assert budget_schedule(14, 100, 40, s) == (40, True)  # the final allocation is forced
    assert budget_schedule(15, 100, 40, s) == (40, False)  # final phase: frozen (the stepper re-applies masks)


def test_threshold_in_both_units_by_hand():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.7, 0.3])
    # ranks: keep the 3 best, peft's rule
    assert mask(scores, threshold(scores, 3)).tolist() == [True, False, True, True, False]
    assert mask(scores, threshold(scores, 5)).all()
    # params: best first 0.9 (cost 10), 0.7 (cost 50), 0.5 (cost 10) -> 70; next 0.3 costs 5 -> 75 > 72: stop
    costs = torch.tensor([10, 5, 10, 50, 5])
    keep = mask(scores, threshold(scores, 72, costs))
    assert keep.tolist() == [True, False, True, True, False] and int(costs[keep].sum()) <= 72
    keep = mask(scores, threshold(scores, 75, costs))
    assert keep.tolist() == [True, False, True, True, True]


def test_select_fills_past_a_triplet_that_no_longer_fits_by_hand():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.7, 0.3])
    costs = torch.tensor([10, 3, 10, 50, 5])
    # best first: 0.9 (10), 0.7 (50), 0.5 (10) -> 70 of 74; 0.3 costs 5 -> 75: the threshold rule stops here
    assert select(scores, 74, costs, fill=False).tolist() == [True, False, True, True, False]
    # fill: 0.3 is skipped, 0.1 (cost 3) still fits -> 73
    assert select(scores, 74, costs).tolist() == [True, True, True, True, False]
    assert select(scores, 3, torch.tensor([4, 4, 4, 4, 3])).tolist() == [False, False, False, False, True]
    assert select(scores, 3).tolist() == [True, False, True, True, False]  # unit ranks: peft's rule


def _plain_greedy(scores, costs, budget):
    """Reference: best first, take every triplet that still fits."""
    left, want = budget, [False] * len(scores)
    for i in sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i)):
        if int(costs[i]) <= left:
            want[i], left = True, left - int(costs[i])
    return want, left


def test_select_is_the_plain_greedy_loop_or_spends_more():
    g = torch.Generator().manual_seed(0)
    improved = 0
    for trial in range(200):
        n = int(torch.randint(1, 40, (1,), generator=g))
        scores = torch.rand(n, generator=g)
        costs = torch.tensor([[769, 1921, 97][int(i)] for i in torch.randint(0, 3, (n,), generator=g)])
        budget = int(torch.randint(0, int(costs.sum()) + 1, (1,), generator=g))
        want, greedy_left = _plain_greedy(scores, costs, budget)
        got = select(scores, budget, costs)
        left = budget - int(costs[got].sum())
        assert 0 <= left <= greedy_left, trial
        if left == greedy_left:
            assert got.tolist() == want, trial  # no exchange taken: exactly the greedy keep
        improved += left < greedy_left
        same_cost = select(scores, budget, torch.full((n,), 5))  # equal costs: the k best, as in unit ranks
        assert same_cost.tolist() == mask(scores, threshold(scores, budget // 5)).tolist(), trial
    assert improved > 0


def test_select_gives_a_wide_triplet_back_for_cheap_ones_by_hand():
    # 3 wide (1,920) triplets score best, then 12 narrow (768): greedy keeps 3 wide + 4 narrow = 8,832 of 9,216;
    # giving the lowest wide one back buys 3 more narrow ones: 2 x 1,920 + 7 x 768 = 9,216 exactly
    scores = torch.tensor([0.9, 0.8, 0.7] + [0.6 - 0.01 * k for k in range(12)])
    costs = torch.tensor([1920] * 3 + [768] * 12)
    assert _plain_greedy(scores, costs, 9216)[1] == 384
    keep = select(scores, 9216, costs)
    assert int(costs[keep].sum()) == 9216
    assert keep.tolist() == [True, True, False] + [True] * 7 + [False] * 5


def test_warmup_prunes_nothing_and_final_phase_freezes_and_reapplies_the_mask():
    built = METHOD.build(_tiny_cls(), _ctx(budget_rank=2))
    _randomise(built)
    st = built.state["stepper"]
    st.bind(Schedule(total_step=12, tinit=3, tfinal=4, deltaT=1))
    g = torch.Generator().manual_seed(0)

    def grads():
        for p in st._params:
            p.grad = torch.randn(p.shape, generator=g)

    init = st.layer_ranks()
    for step in (1, 2, 3):  # warm-up: importance accumulates, every triplet stays
        grads()
        st.step(step)
        assert st.layer_ranks() == init and all(bool((s.E != 0).all()) for s in st.slots)
    assert float(st.avg_ipt.sum()) > 0
    for step in range(4, 9):  # pruning down to the budget; step 8 = 12 - 4 is the final allocation
        grads()
        st.step(step)
    assert st.finalized and st.history[-1][0] == 8 and sum(st.layer_ranks()) < sum(init)
    frozen, ipt = st.keep.clone(), st.avg_ipt.clone()
    pruned = next(i for i, s in enumerate(st.slots) if not bool((s.E != 0).all()))
    with torch.no_grad():
        st.slots[pruned].E.fill_(1.0)  # the optimizer revives a pruned lambda
    grads()
    st.step(9)
    assert torch.equal(st.keep, frozen) and torch.equal(st.avg_ipt, ipt)  # no new scores, same mask
    assert int((st.slots[pruned].E != 0).sum()) == st.layer_ranks()[pruned]  # re-masked


def _peft_pair(total, tinit, tfinal, deltaT, init_r=4, target_r=2):
    """Two identical peft AdaLoRA models: one driven by peft's RankAllocator, one by our stepper (unit ranks)."""
    from peft import AdaLoraConfig, get_peft_model

    def make():
        cfg = AdaLoraConfig(init_r=init_r, target_r=target_r, total_step=total, tinit=tinit, tfinal=tfinal,
                            deltaT=deltaT, lora_alpha=8, task_type="SEQ_CLS",
                            target_modules=["query", "value", "intermediate.dense", "output.dense"])
        return get_peft_model(_tiny_cls(), cfg)

    from rankwise.dynamic.method import _slots

    theirs, ours = make(), make()
    ours.load_state_dict(theirs.state_dict())
    slots = _slots(ours)  # our stepper drives `ours`, peft's RankAllocator drives `theirs`
    st = Stepper(slots, target=target_r * len(slots), unit="ranks")
    st.bind(Schedule(total, tinit, tfinal, deltaT))
    return theirs, ours, st


def test_masks_reproduce_peft_rank_allocator():
    total, tinit, tfinal, deltaT = 24, 3, 6, 2
    theirs, ours, st = _peft_pair(total, tinit, tfinal, deltaT)
    t_params = [p for n, p in theirs.named_parameters() if "lora_" in n]
    o_params = [p for n, p in ours.named_parameters() if "lora_" in n]
    g = torch.Generator().manual_seed(0)
    checked = 0
    for step in range(1, total + 1):
        with torch.no_grad():
            for tp, op in zip(t_params, o_params):  # an "optimizer step" both models take
                delta = torch.randn(tp.shape, generator=g) * 0.05
                tp.add_(delta)
                op.add_(delta)
                grad = torch.randn(tp.shape, generator=g)
                tp.grad, op.grad = grad.clone(), grad.clone()
        theirs.base_model.update_and_allocate(step)
        st.step(step)
        t_e = [p for n, p in theirs.named_parameters() if "lora_E" in n]
        o_e = [p for n, p in ours.named_parameters() if "lora_E" in n]
        assert [bool(b) for t in t_e for b in (t != 0).view(-1)] == [bool(b) for o in o_e for b in (o != 0).view(-1)]
        checked += step > tinit
    pattern = theirs.peft_config["default"].rank_pattern
    mine = st.rank_pattern()
    assert checked and {k.replace(".default", ""): v for k, v in pattern.items()} == mine
    assert sum(map(sum, mine.values())) == 2 * len(mine)  # peft's target_r budget, not uniform
    assert len({sum(v) for v in mine.values()}) > 1


# ---------------------------------------------------------------- integration: Trainer runs


def _data(tmp_path, n=64):
    return write_csv(tmp_path / "data.csv", ["text", "label"], [[t, y] for t, y in sentences(n)])


FAST = dict(batch_size=8, max_length=16, progress=False, device="cpu", lr=5e-3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One Trainer run shared by the tests that only read its results."""
    from conftest import minilm_path, missing
    from rankwise.training.run import train_model
    from test_training_fixtures import save_tiny_bert

    if minilm_path() is None:
        missing("MiniLM not installed (its tokenizer serves the tiny model): make install")
    root = tmp_path_factory.mktemp("adalora")
    base = save_tiny_bert(root / "tiny-bert", minilm_path())
    out = root / "run"
    results, model = train_model(str(base), _data(root), out=out, method="adalora", budget_rank=2, max_steps=24,
                                 **FAST)
    return {"out": out, "results": results, "model": model, "base": base}


def test_trainer_run_falls_to_the_budget_and_writes_its_files(trained):
    out, res = trained["out"], trained["results"]
    info = res["method_info"]
    names = {p.name for p in out.iterdir()}
    assert {"ranks.json", "ranks.md", "rank_history.json", "rank_history.png", "adapter_config.json"} <= names
    table = json.loads((out / "ranks.json").read_text())
    # the budget by hand: rank 2 on the 12 linear layers of the tiny BERT, 8 of them 32x32 (64 per rank) and 4
    # of them 64x32 or 32x64 (96 per rank)
    budget = 2 * (8 * 64 + 4 * 96)
    assert res["run_info"]["budget"]["params"] == budget == 1792
    # what the saved adapter really holds, read from the file: each non-zero singular value (lora_E) is a triplet
    # of one column of B (out), one row of A (in) and itself
    from safetensors.torch import load_file

    tensors = load_file(str(out / "adapter_model.safetensors"))
    saved, triplets = 0, []
    for key, e in tensors.items():
        if key.endswith(".lora_E"):
            stem = key.removesuffix(".lora_E")
            cost = tensors[stem + ".lora_A"].shape[1] + tensors[stem + ".lora_B"].shape[0] + 1
            saved += int(torch.count_nonzero(e)) * cost
            triplets.append(cost)
    assert len(triplets) == 12
    assert saved <= budget and saved > budget - max(triplets)  # spent to within one triplet of the biggest layer
    assert info["final_params"] == saved  # and the run reports what it saved
    by_hand = sum(r["final_rank"] * (r["shape"][0] + r["shape"][1] + 1) for r in table["layers"])
    assert by_hand == saved  # ranks.json agrees with the file
    assert info["peak_params"] == sum(r["init_rank"] * (r["shape"][0] + r["shape"][1] + 1) for r in table["layers"])
    assert info["final_lora_params"] <= budget < info["peak_params"]
    history = json.loads((out / "rank_history.json").read_text())
    assert history["steps"][0] == 0 and all(r == table["init_rank"] for r in history["ranks"][0])
    assert history["ranks"][-1] == [r["final_rank"] for r in table["layers"]]
    assert history["steps"][-1] == info["schedule"]["total_step"] - info["schedule"]["tfinal"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert {k.removesuffix(".lora_E"): sum(v) for k, v in cfg["rank_pattern"].items()} == get_method(
        "adalora").discovered_ranks(out)
    assert res["train_info"]["steps"] == info["steps_run"] == 24


def _logits_in_process(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_reload_equals_trained_model(trained):
    from transformers import AutoModelForSequenceClassification

    import rankwise

    base = AutoModelForSequenceClassification.from_pretrained(str(trained["base"]), num_labels=2)
    loaded = rankwise.load_adapter(base, trained["out"])
    assert torch.allclose(_logits_in_process(loaded), _logits_in_process(trained["model"]), atol=1e-6)


_PLAIN_PEFT = """
import json, sys, torch
from transformers import AutoModelForSequenceClassification
from peft import PeftModel
base = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], num_labels=2)
model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
with torch.no_grad():
    logits = model(input_ids=torch.tensor(json.loads(sys.argv[3]))).logits
assert not [m for m in sys.modules if m.startswith("rankwise")]
print(json.dumps(logits.tolist()))
"""


def _plain_peft_logits(base, adapter) -> torch.Tensor:
    proc = subprocess.run([sys.executable, "-c", _PLAIN_PEFT, str(base), str(adapter), json.dumps(IDS.tolist())],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_export_is_plain_lora_equal_in_a_fresh_process(trained, tmp_path):
    from rankwise.exporting import export

    out = export(trained["out"], tmp_path / "lora", progress=False)
    cfg = json.loads((out / "adapter_config.json").read_text())
    ranks = get_method("adalora").discovered_ranks(trained["out"])
    assert cfg["peft_type"] == "LORA"
    assert sorted(cfg["target_modules"]) == sorted(n for n, r in ranks.items() if r > 0)
    got = _plain_peft_logits(trained["base"], out)
    assert (got - _logits_in_process(trained["model"])).abs().max() <= 1e-5


def test_rank_zero_layers_save_reload_and_export(tmp_path, tiny_bert_dir):
    """A layer whose triplets carry no importance is pruned to rank 0; it reloads, and export leaves it out."""
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert_dir), num_labels=2)
    ctx = _ctx({"tinit": 1, "tfinal": 1}, budget_rank=2, total=3)
    built = METHOD.build(base, ctx)
    _randomise(built)
    st = built.state["stepper"]
    METHOD.callbacks(built, ctx)
    zero = st.slots[3].name
    for i, s in enumerate(st.slots):
        for p in (s.A, s.E, s.B):
            p.grad = torch.zeros_like(p) if i == 3 else torch.rand(p.shape) + 0.1
    for step in (1, 2, 3):
        st.step(step)
    run = tmp_path / "run"
    run.mkdir()
    METHOD.finish(built, ctx, run)
    METHOD.save(built, run)
    (run / "task.json").write_text(json.dumps({"method": "adalora"}))
    assert st.ranks()[zero] == 0 and METHOD.discovered_ranks(run)[zero] == 0
    fresh = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert_dir), num_labels=2)
    loaded = METHOD.load(fresh, run)
    want = _logits_in_process(built.model)
    assert torch.allclose(_logits_in_process(loaded), want, atol=1e-6)
    plain = adalora_to_plain(run)
    assert zero not in plain.config.target_modules and len(plain.config.target_modules) == len(st.slots) - 1
    from rankwise.exporting import save_plain_lora

    save_plain_lora(plain, run, tmp_path / "lora")
    assert (_plain_peft_logits(tiny_bert_dir, tmp_path / "lora") - want).abs().max() <= 1e-5


def test_loud_failure_when_the_allocator_never_runs(tmp_path, tiny_bert_dir, monkeypatch):
    from rankwise.training.run import train_model

    monkeypatch.setattr(AdaLoraMethod, "callbacks", lambda self, built, ctx: [])
    out = tmp_path / "run"
    with pytest.raises(RankwiseError, match="allocation step never ran"):
        train_model(str(tiny_bert_dir), _data(tmp_path, 16), out=out, method="adalora", budget_rank=2, max_steps=2,
                    **FAST)
    assert not out.exists()


def test_loud_failures_when_stopped_early_or_run_after_zero_grad():
    ctx = _ctx(budget_rank=2, total=10)
    built = METHOD.build(_tiny_cls(), ctx)
    METHOD.callbacks(built, ctx)
    st = built.state["stepper"]
    with pytest.raises(RankwiseError, match="without gradients"):
        st.step(1)  # no .grad: what on_step_end (after zero_grad) would see
    for p in st._params:
        p.grad = torch.rand(p.shape)
    st.step(1)
    with pytest.raises(RankwiseError, match="before its final allocation"):
        METHOD.finish(built, ctx, Path("/nonexistent"))
    with pytest.raises(RankwiseError, match="no final rank pattern"):
        METHOD.save(built, Path("/nonexistent"))


def test_gradient_accumulation_counts_optimizer_steps_and_total_from_trainer(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    built = METHOD.build(_tiny_cls(), _ctx(budget_rank=2))
    ctx = _ctx(total=1000)  # a wrong plan: the callback takes the trainer's own step count at train begin
    cb, _ = METHOD.callbacks(built, ctx)
    calls = []
    step = cb.stepper.step
    cb.stepper.step = lambda s: (calls.append(s), step(s))
    g = torch.Generator().manual_seed(0)
    ds = Dataset.from_dict({"input_ids": torch.randint(1, 100, (40, 6), generator=g).tolist(),
                            "labels": [i % 2 for i in range(40)]})
    args = TrainingArguments(output_dir=str(tmp_path / "t"), per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, num_train_epochs=1, report_to="none", use_cpu=True,
                             save_strategy="no", logging_steps=100, disable_tqdm=True)
    trainer = Trainer(model=built.model, args=args, train_dataset=ds, callbacks=[cb])
    trainer.train()
    assert trainer.state.global_step == 5 and calls == [1, 2, 3, 4, 5]  # 40 / (4 x 2) optimizer steps
    assert cb.stepper.schedule.total_step == 5 and cb.stepper.finalized


def test_orth_penalty_in_training_only_and_equal_to_peft_formula():
    built = METHOD.build(_tiny_cls(), _ctx({"orth_reg_weight": 0.5}, budget_rank=2))
    _randomise(built)
    model, reg = built.model, built.state["regulariser"]
    by_hand, n = 0.0, 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                gram = p @ p.T if ".lora_A." in name else p.T @ p
                by_hand += float(torch.linalg.norm(gram - torch.eye(gram.shape[0])))
                n += 1
        assert math.isclose(float(reg()), by_hand / n, rel_tol=1e-5)
    labels = torch.tensor([0, 1])
    model.eval()
    with torch.no_grad():
        eval_loss = float(model(input_ids=IDS, labels=labels).loss)
        plain = float(torch.nn.functional.cross_entropy(model(input_ids=IDS).logits, labels))
    assert math.isclose(eval_loss, plain, rel_tol=1e-6)  # evaluation losses stay the task's loss
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    train_loss = model(input_ids=IDS, labels=labels).loss.item()
    assert math.isclose(train_loss, plain + 0.5 * by_hand / n, rel_tol=1e-5)


def test_logged_train_loss_is_the_task_loss_and_the_penalty_is_logged_apart(tmp_path):
    """lr 0 keeps the weights fixed: each logged loss must equal the plain cross-entropy of its batches computed
    in a separate loop, and orth_penalty the weight times the hand-computed penalty."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from rankwise.dynamic.callback import PenaltyLog

    model = _tiny_cls()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    built = METHOD.build(model, _ctx({"orth_reg_weight": 0.5}, budget_rank=2))
    _randomise(built)
    reg = built.state["regulariser"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (16, 6), generator=g)
    labels = [i % 2 for i in range(16)]
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=0.0,
                             num_train_epochs=1, report_to="none", use_cpu=True, save_strategy="no",
                             logging_steps=2, disable_tqdm=True, lr_scheduler_type="constant", seed=0)
    trainer = Trainer(model=built.model, args=args, train_dataset=ds, callbacks=[PenaltyLog(reg)])
    order = list(trainer.get_train_dataloader().sampler)  # the batches Trainer will draw
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    assert [h["step"] for h in logged] == [2, 4]
    with torch.no_grad():
        penalty = 0.5 * float(reg())
        built.model.eval()
        per_row = torch.nn.functional.cross_entropy(built.model(input_ids=ids).logits, torch.tensor(labels),
                                                    reduction="none")
    batches = [per_row[order[i:i + 4]].mean().item() for i in range(0, 16, 4)]
    for k, h in enumerate(logged):
        assert math.isclose(h["loss"], sum(batches[2 * k:2 * k + 2]) / 2, rel_tol=1e-4, abs_tol=1e-5)
        assert math.isclose(h["orth_penalty"], penalty, rel_tol=1e-4)
    assert math.isclose(reg.mean_total(), penalty, rel_tol=1e-4)


# ---------------------------------------------------------------- distributed


_DDP = r"""
import json, os, sys, torch
from pathlib import Path
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments
from rankwise.dynamic.method import AdaLoraMethod
from rankwise.dynamic.importance import select
from rankwise.methods import MethodContext

model_dir, out = sys.argv[1], Path(sys.argv[2])
torch.manual_seed(0)
base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
ctx = MethodContext(task="seq-cls", model_name="tiny", model_path=model_dir,
                    lora_kwargs={"task_type": "SEQ_CLS", "modules_to_save": ["classifier"]},
                    choice={"budget_rank": 2}, options={"deltaT": 1}, progress=False, total_steps=6)
method = AdaLoraMethod()
built = method.build(base, ctx)
cbs = method.callbacks(built, ctx)
[cb] = [c for c in cbs if hasattr(c, "stepper")]  # the allocation callback; the other logs the penalty
st = cb.stepper
local = []  # masks each process computes from its own scores, before the broadcast
orig = st._allocate
def allocate(budget, step):
    orig(budget, step)
    local.append(select(st.scores, budget, st.costs, st.fill).tolist())
st._allocate = allocate
g = torch.Generator().manual_seed(0)
ds = Dataset.from_dict({"input_ids": torch.randint(1, 1000, (48, 8), generator=g).tolist(),
                        "labels": [i % 2 for i in range(48)]})
args = TrainingArguments(output_dir=str(out / "t"), per_device_train_batch_size=4, num_train_epochs=1,
                         report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
                         ddp_backend="gloo", logging_steps=100)
trainer = Trainer(model=built.model, args=args, train_dataset=ds, callbacks=cbs)
trainer.train()
rank = int(os.environ.get("RANK", 0))
(out / f"rank{rank}.json").write_text(json.dumps({
    "world": int(os.environ.get("WORLD_SIZE", 1)), "steps": st.steps_run, "final": st.finalized,
    "keep": st.keep.tolist(), "local": local, "scores": st.scores.tolist(), "ipt": float(st.avg_ipt.sum()),
    "ranks": st.layer_ranks()}))
"""


@pytest.mark.slow
def test_two_process_gloo_run_ends_with_identical_masks(tmp_path, tiny_bert_dir):
    script = tmp_path / "ddp.py"
    script.write_text(_DDP)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29517", str(script),
                           str(tiny_bert_dir), str(tmp_path)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["steps"] == r1["steps"] == 6 and r0["final"] and r1["final"]  # 48 / (4 x 2 processes)
    # importance from all-reduced gradients: every process scored every triplet identically, so the masks each
    # computed locally agree before rank 0's broadcast, at every allocation
    assert r0["scores"] == r1["scores"] and r0["ipt"] == r1["ipt"]
    assert r0["local"] == r1["local"] and len(r0["local"]) >= 2
    assert r0["keep"] == r1["keep"] and r0["ranks"] == r1["ranks"]


def test_causal_lm_run_within_budget_and_exact_export(tmp_path, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rankwise.exporting import export
    from rankwise.training.run import train_model

    text = tmp_path / "text.txt"
    text.write_text("".join(f"{t}\n" for t, _ in sentences(200)))
    results, model = train_model(str(tiny_llama_dir), str(text), out=tmp_path / "run", method="adalora",
                                 budget="5k", max_steps=6, batch_size=4, max_length=32, progress=False, device="cpu")
    info = results["method_info"]
    assert info["final_params"] <= 5000 < info["peak_params"] and info["steps_run"] == 6
    lora = export(tmp_path / "run", tmp_path / "lora", progress=False)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)), str(lora))
    assert (_logits_in_process(plain) - _logits_in_process(model)).abs().max() <= 1e-5


def test_lora_params_unit_budgets_what_the_exported_plain_lora_holds():
    built = METHOD.build(_tiny_cls(), _ctx({"unit": "lora_params", "init_rank": 4}, total=20, budget="1792"))
    st = built.state["stepper"]
    # by hand: the tiny BERT's 12 linears are 8 of 32x32 (64 per rank) and 4 of 64x32 / 32x64 (96), lambda not counted
    assert sorted(st.costs.tolist()) == sorted([64] * 4 * 8 + [96] * 4 * 4)
    assert st.init_budget == 4 * (8 * 64 + 4 * 96) and st.cost_of.tolist() == [c + 1 for c in st.costs.tolist()]
    st.scores = torch.rand(st.n, generator=torch.Generator().manual_seed(0))
    keep = select(st.scores, 1792, st.costs)
    assert int(st.costs[keep].sum()) == 1792  # 28 x 64 = 1,792 fits exactly; with lambda (65 each) it could not
    params = METHOD.build(_tiny_cls(), _ctx({"init_rank": 4}, total=20, budget="1792")).state["stepper"]
    assert params.costs.tolist() == st.cost_of.tolist()

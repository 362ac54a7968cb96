"""Plan -> peft round trip: what get_peft_model builds must be exactly what the plan says."""

import json

import pytest

from rankwise import apply, make_plan
from rankwise.allocators import list_allocators
from rankwise.apply import lora_layers, verify_on_skeleton
from rankwise.plan import Plan
from rankwise.targets import adaptable_layers
from rankwise.types import LayerStats, RankwiseError

STRATEGIES = [s.name for s in list_allocators()]


def fake_stats(model, targets=None):
    """Deterministic, varied metrics so every allocator (spectral included) gives non-uniform ranks."""
    from rankwise.targets import resolve_targets

    out = []
    for i, lay in enumerate(resolve_targets(model, targets)):
        out.append(LayerStats(lay, {"alpha_hill": 2.0 + (i * 7 % 5), "alpha": 3.0, "num_spikes": float(i % 4),
                                    "stable_rank": 1.0 + i % 3, "frobenius_norm": 1.0 + i,
                                    "discovered_rank": float(1 + i % 4),
                                    # what a calibration pass (--data) measures, for the data-driven strategies
                                    "act_in_norm2": 1.0 + i % 5, "act_out_norm2": 2.0 + i % 3,
                                    "act_effective_rank": 3.0 + i % 7, "grad_norm": 0.1 * (1 + i % 4),
                                    "grad_sensitivity": 0.5 + i % 6, "act_evr_1": 0.3 + 0.05 * (i % 5),
                                    "act_evr_2": 0.2, "act_evr_3": 0.1 - 0.01 * (i % 4)}))
    return out


@pytest.mark.parametrize("model_fn", ["tiny_bert", "tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_round_trip_every_strategy(model_fn, strategy):
    import conftest

    model = getattr(conftest, model_fn)()
    stats = fake_stats(model)
    plan = make_plan(model, strategy, budget_rank=4, stats=stats, max_rank=12)
    before = sum(p.numel() for p in model.parameters())
    peft_model = apply(model, plan)
    real = lora_layers(peft_model)
    assert {n: r for n, (r, _, _) in real.items()} == plan.ranks
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == plan.spent == sum(n for _, _, n in real.values())
    assert sum(p.numel() for p in peft_model.parameters()) == before + plan.spent
    cheapest = min(r.shape[0] + r.shape[1] for r in plan.adapted)  # one rank step, computed here
    assert plan.budget.params - cheapest < plan.spent <= plan.budget.params


def test_bert_output_dense_collision_gets_distinct_ranks(bert):
    """peft with suffix keys gives `attention.output.dense` and `output.dense` the same rank; our keys don't."""
    stats = fake_stats(bert)
    plan = make_plan(bert, "uniform", budget_rank=4, stats=stats)
    for row in plan.layers:  # hand-edit: FFN output rank 2, attention output rank 6
        if row.name.endswith("attention.output.dense"):
            row.rank, row.alpha = 6, 12.0
        elif row.name.endswith(".output.dense"):
            row.rank, row.alpha = 2, 4.0
        row.params = row.rank * (row.shape[0] + row.shape[1])
    peft_model = apply(bert, plan)
    real = lora_layers(peft_model)
    for i in range(2):
        assert real[f"encoder.layer.{i}.attention.output.dense"][:2] == (6, 12.0)
        assert real[f"encoder.layer.{i}.output.dense"][:2] == (2, 4.0)


def test_plan_on_bare_model_applies_under_task_head():
    from conftest import tiny_bert

    bare = tiny_bert()
    plan = make_plan(bare, "spectral", "3000", stats=fake_stats(bare))
    clf = tiny_bert("BertForSequenceClassification", num_labels=3)
    peft_model = apply(clf, plan, modules_to_save=["classifier"], task_type="SEQ_CLS")
    real = lora_layers(peft_model)
    assert {n.removeprefix("bert."): r for n, (r, _, _) in real.items()} == plan.ranks


def test_plan_made_for_another_model_is_rejected(bert, llama):
    plan = make_plan(bert, "uniform", budget_rank=2, stats=fake_stats(bert))
    with pytest.raises(RankwiseError, match="another model"):
        apply(llama, plan)


def test_verify_catches_tampering(bert):
    plan = make_plan(bert, "uniform", budget_rank=2, stats=fake_stats(bert))
    peft_model = apply(bert, plan)
    plan.layers[0].rank = 3
    plan.layers[0].params = 3 * 64
    from rankwise.apply import verify

    with pytest.raises(RankwiseError, match="did not apply the plan"):
        verify(peft_model, plan)


def test_save_load_and_peft_loads_config(tmp_path, bert):
    from peft import LoraConfig, get_peft_model

    plan = make_plan(bert, "depth", "2500", stats=fake_stats(bert), alpha_factor=1.5)
    plan.save(tmp_path / "p")
    loaded = Plan.load(tmp_path / "p")
    assert loaded.to_dict() == plan.to_dict()
    data = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert {"strategy", "budget", "spent", "layers", "schema"} <= set(data)
    assert {"name", "rank", "alpha", "params"} <= set(data["layers"][0])
    cfg = LoraConfig.from_pretrained(str(tmp_path / "p"))
    real = lora_layers(get_peft_model(bert, cfg))
    assert {n: (r, a) for n, (r, a, _) in real.items()} == {r.name: (r.rank, r.alpha) for r in plan.adapted}


def test_load_errors(tmp_path):
    with pytest.raises(RankwiseError, match="no plan"):
        Plan.load(tmp_path)
    (tmp_path / "plan.json").write_text("{not json")
    with pytest.raises(RankwiseError, match="not a valid"):
        Plan.load(tmp_path)


def test_lora_alpha_override_and_kwargs(bert):
    plan = make_plan(bert, "uniform", budget_rank=2, stats=fake_stats(bert))
    peft_model = apply(bert, plan, lora_alpha=7.0, lora_dropout=0.1)
    assert {a for _, a, _ in lora_layers(peft_model).values()} == {7.0}


def test_conv1d_gets_fan_in_fan_out(gpt2):
    # the numerics (x @ (W + s (B A)^T) + b with B != 0) are checked by hand in test_references.py
    cfg = make_plan(gpt2, "uniform", budget_rank=2, stats=fake_stats(gpt2)).to_lora_config()
    assert cfg.fan_in_fan_out is True


def test_verify_on_meta_skeleton(bert_dir):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(bert_dir)
    plan = make_plan(model, "module_type", "2000", stats=fake_stats(model))
    assert verify_on_skeleton(bert_dir, plan) is True
    assert verify_on_skeleton(bert_dir.parent, plan) is False  # no config.json: nothing to build


def test_plan_table_mentions_budget(bert):
    plan = make_plan(bert, "uniform", "2k", stats=fake_stats(bert))
    text = plan.format_table()
    assert "budget=2,000" in text and "encoder.layer.1.output.dense" in text
    assert len(adaptable_layers(bert)) - 1 == len(plan.layers)  # all but the pooler (a head)


def test_percent_budget_counts_checkpoint_params(bert_dir):
    from transformers import AutoModel

    from rankwise.plan import count_params

    total = sum(p.numel() for p in AutoModel.from_pretrained(bert_dir).parameters())
    assert count_params(bert_dir) == total
    plan = make_plan(str(bert_dir), "uniform", "5%", progress=False)
    assert plan.budget.params == int(total * 0.05) and plan.spent <= plan.budget.params

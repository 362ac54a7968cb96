"""Calibration statistics against brute force: every example run alone (no padding), inputs captured by hand,
losses written out by hand, gradients from one autograd call on the full loss. Plus masking, Conv1D,
determinism, and proof that the validation split is never read."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import tiny_bert, tiny_gpt2, tiny_llama
from rankwise.stats.calibration import Calibration, calibrate, evr_key
from rankwise.targets import resolve_targets
from rankwise.types import RankwiseError
from test_training_fixtures import sentences, tiny_bert_dir, write_jsonl  # noqa: F401

PAD = 0


def _examples(n, seed, *, labels="class", prompt=False):
    """Token rows of different lengths; causal rows mask a prompt of random length with -100."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(3, 14, (1,), generator=g))
        ids = torch.randint(1, 100, (length,), generator=g).tolist()
        if labels == "class":
            rows.append({"input_ids": ids, "labels": i % 2})
        else:
            cut = int(torch.randint(1, length - 1, (1,), generator=g)) if prompt else 0
            rows.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return rows


def _collate(rows):
    """Right padding: pad id 0, attention 0, labels -100 (what rankwise's collators do)."""
    width = max(len(r["input_ids"]) for r in rows)
    pad = [width - len(r["input_ids"]) for r in rows]
    out = {"input_ids": torch.tensor([r["input_ids"] + [PAD] * p for r, p in zip(rows, pad)]),
           "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * p for r, p in zip(rows, pad)])}
    if isinstance(rows[0]["labels"], list):
        out["labels"] = torch.tensor([r["labels"] + [-100] * p for r, p in zip(rows, pad)])
    else:
        out["labels"] = torch.tensor([r["labels"] for r in rows])
    return out


def _captured_inputs(model, layers, rows):
    """{layer: (inputs [tokens, in], outputs [tokens, out])} from running every example alone."""
    mods = dict(model.named_modules())
    seen = {lay.name: ([], []) for lay in layers}

    def keep(name):
        def hook(module, inputs, output):
            seen[name][0].append(inputs[0].detach().reshape(-1, inputs[0].shape[-1]))
            seen[name][1].append(output.detach().reshape(-1, output.shape[-1]))
        return hook

    handles = [mods[lay.name].register_forward_hook(keep(lay.name)) for lay in layers]
    with torch.no_grad():
        for r in rows:
            model(input_ids=torch.tensor([r["input_ids"]]))
    for h in handles:
        h.remove()
    return {n: (torch.cat(x).double(), torch.cat(y).double()) for n, (x, y) in seen.items()}


def _check_activations(result, model, layers, rows):
    ref = _captured_inputs(model, layers, rows)
    for lay in layers:
        x, y = ref[lay.name]
        got = result.metrics[lay.name]
        assert x.shape[1] == lay.in_features
        assert got["act_in_norm2"] == pytest.approx(float((x**2).sum(1).mean()), rel=1e-5)
        assert got["act_out_norm2"] == pytest.approx(float((y**2).sum(1).mean()), rel=1e-5)
        ev = np.sort(np.linalg.eigvalsh((x.T @ x / x.shape[0]).numpy()))[::-1].clip(0)
        share = ev / ev.sum()
        sv = np.sqrt(ev[ev > 0])
        p = sv / sv.sum()
        assert got["act_effective_rank"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-4)
        assert got["act_explained_topk"] == pytest.approx(share[:3].sum(), rel=1e-5)
        for i in range(4):
            assert got[evr_key(i + 1)] == pytest.approx(share[i], rel=1e-4, abs=1e-9)
    assert result.tokens == sum(len(r["input_ids"]) for r in rows)


def _check_gradients(result, model, layers, full_loss):
    mods = dict(model.named_modules())
    weights = [mods[lay.name].weight for lay in layers]
    grads = torch.autograd.grad(full_loss(), weights)
    for lay, w, g in zip(layers, weights, grads):
        g, w = g.double(), w.detach().double()
        got = result.metrics[lay.name]
        sv = np.linalg.svd(g.numpy(), compute_uv=False)
        assert got["grad_norm"] == pytest.approx(float(np.sqrt((sv**2).sum())), rel=1e-4)
        assert got["grad_sensitivity"] == pytest.approx(float((w * g).abs().sum()), rel=1e-4)
        assert got["grad_stable_rank"] == pytest.approx(float((sv**2).sum() / sv[0] ** 2), rel=1e-3)


def _cal(rows, **kw):
    return Calibration(rows, _collate, samples=len(rows), batch_size=4, top_k=3, components=4, **kw)


def test_sequence_classification_matches_brute_force():
    model = tiny_bert("BertForSequenceClassification", num_labels=2)
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking head: the default init makes every gradient ~1e-9
        model.classifier.weight.normal_(0, 1.0)
    rows = _examples(10, 0)
    layers = resolve_targets(model)
    result = calibrate(model, _cal(rows), layers)
    _check_activations(result, model, layers, rows)

    def full_loss():  # mean cross-entropy over all examples, each run alone
        losses = [torch.nn.functional.cross_entropy(model(input_ids=torch.tensor([r["input_ids"]])).logits,
                                                    torch.tensor([r["labels"]])) for r in rows]
        return torch.stack(losses).mean()

    _check_gradients(result, model, layers, full_loss)
    assert result.loss_terms == 10 and result.examples == 10


def _causal_full_loss(model, rows):
    """Mean over every target token (label != -100) of -log p(token | prefix), written out by hand."""
    def fn():
        total, count = 0.0, 0
        for r in rows:
            logits = model(input_ids=torch.tensor([r["input_ids"]])).logits[0]
            logp = torch.log_softmax(logits[:-1].float(), -1)
            for t, y in enumerate(r["labels"][1:]):
                if y != -100:
                    total = total - logp[t, y]
                    count += 1
        return total / count
    return fn


def test_causal_lm_masking_matches_brute_force():
    """Prompt tokens (-100) are not in the loss; padded positions are in neither loss nor activations."""
    model = tiny_llama()
    rows = _examples(9, 3, labels="tokens", prompt=True)
    layers = resolve_targets(model)
    result = calibrate(model, _cal(rows), layers)
    _check_activations(result, model, layers, rows)
    _check_gradients(result, model, layers, _causal_full_loss(model, rows))
    assert result.loss_terms == sum(sum(y != -100 for y in r["labels"][1:]) for r in rows)


def test_gpt2_conv1d_orientation():
    """Conv1D stores [in, out]: inputs are `in` wide, LayerInfo reads [out, in], gradient metrics agree."""
    model = tiny_gpt2()
    rows = _examples(6, 5, labels="tokens")
    layers = resolve_targets(model)
    assert {lay.kind for lay in layers} == {"conv1d"}
    c_attn = next(lay for lay in layers if lay.name.endswith("c_attn"))
    assert c_attn.shape == (96, 32)
    result = calibrate(model, _cal(rows), layers)
    _check_activations(result, model, layers, rows)
    _check_gradients(result, model, layers, _causal_full_loss(model, rows))


def test_deterministic_and_side_effect_free():
    model = tiny_bert("BertForSequenceClassification", num_labels=2)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    rows = _examples(20, 1)
    layers = resolve_targets(model, ["query", "value"])
    cal = Calibration(rows, _collate, samples=8, seed=4, batch_size=3)
    a, b = calibrate(model, cal, layers), calibrate(model, cal, layers)
    assert a.metrics == b.metrics and a.examples == 8
    other = calibrate(model, Calibration(rows, _collate, samples=8, seed=5, batch_size=3), layers)
    assert other.metrics != a.metrics  # another seed draws other examples
    assert torch.equal(torch.get_rng_state(), rng)  # LoRA init after calibration is unchanged
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_plan_names_map_onto_the_head_model_and_shapes_are_checked():
    from rankwise.types import LayerInfo

    model = tiny_bert("BertForSequenceClassification", num_labels=2)
    bare = [LayerInfo("encoder.layer.0.attention.self.query", 32, 32)]  # as a plan on BertModel names it
    result = calibrate(model, _cal(_examples(4, 0)), bare)
    assert set(result.metrics) == {"encoder.layer.0.attention.self.query"}
    with pytest.raises(RankwiseError, match="calibrate the model you plan for"):
        calibrate(model, _cal(_examples(4, 0)), [LayerInfo("encoder.layer.0.attention.self.query", 16, 32)])
    with pytest.raises(RankwiseError, match="calib-samples"):
        calibrate(model, Calibration(_examples(4, 0), _collate, samples=0), bare)


def test_data_strategy_without_data_names_the_flag(bert_dir, capsys):
    from rankwise.cli import main
    from rankwise.plan import make_plan

    with pytest.raises(RankwiseError, match="--data"):
        make_plan(tiny_bert(), "gradient", "2k", progress=False)
    assert main(["plan", str(bert_dir), "-s", "eva", "--budget", "2k", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--data" in err and len(err.splitlines()) == 1


def _poisoned_folder(tmp_path):
    """train.jsonl is fine; validation.jsonl is not JSON at all: reading it fails loudly."""
    d = tmp_path / "data"
    write_jsonl(d / "train.jsonl", [{"sentence": t, "label": y} for t, y in sentences(24)])
    (d / "validation.jsonl").write_text("{this is not json\n" * 5)
    return d


def test_plan_reads_only_the_training_split(tmp_path, tiny_bert_dir, capsys):
    from rankwise.cli import main

    out = tmp_path / "plan"
    code = main(["plan", str(tiny_bert_dir), "-s", "gradient", "--budget", "3k", "--data",
                 str(_poisoned_folder(tmp_path)), "--calib-samples", "8", "-q", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    plan = json.loads((out / "plan.json").read_text())
    cal = plan["calibration"]
    assert (cal["split"], cal["samples"], cal["examples"], cal["seed"], cal["task"]) == ("train", 8, 8, 0, "seq-cls")
    assert all("grad_sensitivity" in row["metrics"] for row in plan["layers"])
    # gradient reads only gradient metrics: the forward-only activation statistics are not measured
    assert (cal["gradients"], cal["activations"]) == (True, False)
    assert not any("act_effective_rank" in row["metrics"] for row in plan["layers"])
    assert plan["spent"] <= 3000 and len({row["rank"] for row in plan["layers"]}) > 1


def test_train_calibrates_on_train_rows_only(tmp_path, tiny_bert_dir, monkeypatch):
    """A spy on every calibration batch: no token of a validation-only word ever reaches the model."""
    import rankwise.stats.calibration as calmod
    from rankwise.training.run import train_model
    from transformers import AutoTokenizer

    d = tmp_path / "data"
    write_jsonl(d / "train.jsonl", [{"sentence": t, "label": y} for t, y in sentences(24)])
    write_jsonl(d / "validation.jsonl", [{"sentence": "zebra zebra zebra", "label": i % 2} for i in range(8)])
    zebra = AutoTokenizer.from_pretrained(tiny_bert_dir)("zebra", add_special_tokens=False)["input_ids"]
    seen = []
    real = calmod.calibrate

    def spy(model, cal, layers, **kw):
        collate = cal.collate

        def recording(rows):
            batch = collate(rows)
            seen.append(batch["input_ids"])
            return batch

        cal.collate = recording
        return real(model, cal, layers, **kw)

    monkeypatch.setattr(calmod, "calibrate", spy)
    results, _ = train_model(str(tiny_bert_dir), d, out=tmp_path / "run", strategy="eva", budget_rank=4,
                             calib_samples=16, max_steps=1, batch_size=4, progress=False, device="cpu")
    ids = torch.cat([t.flatten() for t in seen])
    assert sum(len(t) for t in seen) == 16  # the calibration sample, all of it from train
    assert not any(int(t) in zebra for t in ids)
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["strategy"] == "eva" and plan["calibration"]["examples"] == 16
    assert (plan["calibration"]["activations"], plan["calibration"]["gradients"]) == (True, False)  # no backward
    assert plan["calibration"]["data"] == str(d) and results["eval"]["num_samples"] == 8


def test_single_file_calibration_uses_the_train_part(tmp_path):
    from rankwise.training.calibrate import load_train_split
    from rankwise.training.data import load_splits

    f = write_jsonl(tmp_path / "all.jsonl", [{"text": f"row {i}", "label": i % 2} for i in range(40)])
    train, kind = load_train_split(f, validation_split=0.25, seed=3)
    splits, _ = load_splits(f, validation_split=0.25, seed=3)
    assert kind == "table" and train["text"] == splits["train"]["text"]
    assert not set(train["text"]) & set(splits["validation"]["text"])

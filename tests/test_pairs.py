"""--pair-encoding separate: rows split back into their sentences, a forward checked against a hand-written
bi-encoder, and a run that trains, saves, evaluates and predicts through it."""

from __future__ import annotations

import json

import pytest
import torch

from rankwise.training.pairs import encode_separately, separate_pairs, split_pairs
from rankwise.types import RankwiseError

from test_training_fixtures import tiny_bert_dir, write_jsonl  # noqa: F401

FIRST = ["a cat sat on the mat", "dogs bark", "the quick brown fox jumps over the lazy dog"]
SECOND = ["a cat sat", "a very loud dog barks at night all night long", "fox"]


def _tokenizer(minilm):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm)


def _tiny_classifier(num_labels=2, **kw):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                     vocab_size=30522, max_position_embeddings=64, num_labels=num_labels, **kw)
    return BertForSequenceClassification(cfg).eval()


def _batch(tok, first=FIRST, second=SECOND, max_length=32):
    return tok.pad(encode_separately(tok, first, second, max_length), return_tensors="pt")


def test_rows_split_back_into_each_sentence_as_tokenized_alone(minilm):
    tok = _tokenizer(minilm)
    rows = _batch(tok)
    ids, mask = split_pairs(rows["input_ids"], rows["attention_mask"], rows["token_type_ids"])
    assert ids.shape[0] == 2 * len(FIRST)
    for i, text in enumerate(FIRST + SECOND):
        alone = tok(text)["input_ids"]  # [CLS] text [SEP], what a sentence-embedding model was trained on
        assert ids[i, :len(alone)].tolist() == alone
        assert mask[i].tolist() == [1] * len(alone) + [0] * (ids.shape[1] - len(alone))


def test_each_sentence_is_truncated_on_its_own(minilm):
    tok = _tokenizer(minilm)
    rows = encode_separately(tok, ["one two three four five six seven"], ["eight nine ten eleven twelve"], 5)
    assert rows["token_type_ids"][0] == [0] * 5 + [1] * 5
    assert rows["input_ids"][0] == tok("one two three four five six seven", truncation=True, max_length=5)[
        "input_ids"] + tok("eight nine ten eleven twelve", truncation=True, max_length=5)["input_ids"]


def _embed(model, tok, text):
    enc = tok(text, return_tensors="pt")
    hidden = model.bert(**enc).last_hidden_state[0]
    return torch.nn.functional.normalize(hidden.mean(0), dim=-1)  # one sentence: no padding to mask


@pytest.mark.parametrize("num_labels", [2, 1])
def test_forward_matches_a_hand_written_bi_encoder(minilm, num_labels):
    tok = _tokenizer(minilm)
    model = _tiny_classifier(num_labels)
    labels = torch.tensor([0, 1, 1]) if num_labels == 2 else torch.tensor([0.2, 0.9, 0.5])
    if num_labels == 1:
        model.config.problem_type = "regression"
    with torch.no_grad():
        # the reference: each sentence alone through the encoder, one at a time, then the cosine into the head
        cos = torch.stack([_embed(model, tok, a) @ _embed(model, tok, b) for a, b in zip(FIRST, SECOND)])
        w = model.classifier.weight
        want = 20 * (cos[:, None] * w[:, 0] + w[:, 1]) + model.classifier.bias
        out = separate_pairs(model)(**_batch(tok), labels=labels)
    torch.testing.assert_close(out.logits, want, atol=1e-5, rtol=1e-4)
    if num_labels == 2:
        ref_loss = -torch.log_softmax(want, -1)[torch.arange(3), labels].mean()
    else:
        ref_loss = ((want[:, 0] - labels) ** 2).mean()
    torch.testing.assert_close(out.loss, ref_loss, atol=1e-5, rtol=1e-4)


def test_a_model_without_a_linear_classifier_is_refused():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    model = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(RankwiseError, match="BERT-style"):
        separate_pairs(model)


def test_a_row_without_a_second_sentence_is_refused(minilm):
    tok = _tokenizer(minilm)
    rows = tok(["only one sentence"], return_tensors="pt")
    with pytest.raises(RankwiseError, match="no second sentence"):
        separate_pairs(_tiny_classifier())(**rows)


def _pairs(path, n):
    words = ["cat", "dog", "fox", "bird", "fish", "cow"]
    rows = [{"sentence1": f"the {words[i % 6]} sat", "sentence2": f"a {words[(i + i % 2) % 6]} sat",
             "label": i % 2} for i in range(n)]
    write_jsonl(path / "train.jsonl", rows)
    write_jsonl(path / "validation.jsonl", rows[:12])
    return path


def test_a_separate_run_trains_saves_evaluates_and_predicts(tmp_path, tiny_bert_dir):
    from rankwise.training import evaluate_run, predict, train

    data = _pairs(tmp_path / "pairs", 32)
    res = train(tiny_bert_dir, data, pair_encoding="separate", rank=2, max_steps=3, out=tmp_path / "run",
                progress=False)
    task = json.loads((tmp_path / "run" / "task.json").read_text())
    assert task["pair_encoding"] == "separate" and res["run_info"]["hparams"]["pair_encoding"] == "separate"
    again = evaluate_run(tmp_path / "run", data, progress=False, device="cpu")
    assert again["eval_loss"] == pytest.approx(res["eval"]["eval_loss"], rel=1e-5)
    out = predict(tmp_path / "run", ["the cat sat"], text_pairs=["a cat sat"], device="cpu")
    assert out[0]["label"] in ("0", "1") and 0.5 <= out[0]["score"] <= 1
    with pytest.raises(RankwiseError, match="--text-pair"):
        predict(tmp_path / "run", ["the cat sat"], device="cpu")


def test_separate_needs_two_text_columns(tmp_path, tiny_bert_dir):
    from rankwise.training import train

    data = tmp_path / "single"
    write_jsonl(data / "train.jsonl", [{"text": f"t {i}", "label": i % 2} for i in range(16)])
    with pytest.raises(RankwiseError, match="exactly two text columns"):
        train(tiny_bert_dir, data, pair_encoding="separate", rank=2, max_steps=1, out=tmp_path / "r",
              progress=False)
    with pytest.raises(RankwiseError, match="joint, separate"):
        train(tiny_bert_dir, data, pair_encoding="cross", rank=2, max_steps=1, out=tmp_path / "r2", progress=False)


@pytest.mark.parametrize("num_labels", [2, 3, 1])
def test_the_head_starts_as_the_regression_on_the_untouched_cosines(minilm, num_labels):
    """fit_head against scikit-learn's unpenalised logistic regression (classes) and numpy's least squares
    (regression), both on cosines computed one sentence at a time."""
    import numpy as np
    from datasets import Dataset
    from sklearn.linear_model import LogisticRegression
    from transformers import DataCollatorWithPadding

    from rankwise.training.pairs import fit_head

    tok = _tokenizer(minilm)
    model = _tiny_classifier(num_labels)
    model.config.problem_type = "regression" if num_labels == 1 else "single_label_classification"
    words = ["cat", "dog", "fox", "bird", "fish", "cow", "sat", "ran", "the", "a", "big", "small"]
    rng = np.random.default_rng(0)
    first = [" ".join(rng.choice(words, 4)) for _ in range(24)]
    second = [" ".join(rng.choice(words, 3)) for _ in range(24)]
    with torch.no_grad():
        cos = np.array([float(_embed(model, tok, a) @ _embed(model, tok, b)) for a, b in zip(first, second)])
    # labels that depend on the cosine, with noise, so the fit is finite and not trivial
    noisy = cos + rng.normal(0, 0.5 * cos.std(), len(cos))
    labels = noisy if num_labels == 1 else np.digitize(noisy, np.quantile(noisy, np.linspace(0, 1, num_labels + 1)[1:-1]))
    rows = encode_separately(tok, first, second, 32)
    rows["labels"] = [float(v) for v in labels] if num_labels == 1 else [int(v) for v in labels]
    fit = fit_head(separate_pairs(model), Dataset.from_dict(rows), DataCollatorWithPadding(tok))
    with torch.no_grad():
        logits = model(**_batch(tok, first, second)).logits.double().numpy()
    if num_labels == 1:
        slope, intercept = np.polyfit(cos, labels, 1)
        np.testing.assert_allclose(logits[:, 0], slope * cos + intercept, atol=1e-4)
    else:
        ref = LogisticRegression(C=np.inf, tol=1e-10, max_iter=10_000).fit(cos[:, None], labels)
        np.testing.assert_allclose(torch.tensor(logits).softmax(-1).numpy(), ref.predict_proba(cos[:, None]), atol=2e-3)
    assert fit["samples"] == 24


def test_cosines_come_back_in_the_dataset_order(minilm):
    """The head's cosines are computed in batches sorted by length; each must still sit on its own row (and beside
    its own label), against cosines computed one sentence at a time."""
    import numpy as np
    from datasets import Dataset
    from transformers import DataCollatorWithPadding

    from rankwise.training.pairs import _cosines

    tok = _tokenizer(minilm)
    model = separate_pairs(_tiny_classifier(2))
    words = ["cat", "dog", "fox", "bird", "fish", "cow", "sat", "ran", "the", "a", "big", "small"]
    rng = np.random.default_rng(1)
    first = [" ".join(rng.choice(words, n)) for n in rng.integers(1, 12, 20)]  # lengths out of order
    second = [" ".join(rng.choice(words, n)) for n in rng.integers(1, 6, 20)]
    rows = encode_separately(tok, first, second, 32)
    rows["labels"] = list(range(20))
    cos, labels = _cosines(model, Dataset.from_dict(rows), DataCollatorWithPadding(tok), batch_size=3)
    with torch.no_grad():
        ref = [float(_embed(model, tok, a) @ _embed(model, tok, b)) for a, b in zip(first, second)]
    assert labels.tolist() == list(range(20))
    np.testing.assert_allclose(cos.numpy(), ref, atol=1e-5)


@pytest.mark.parametrize("method", ["peft_eva", "adalora", "multirank"])
def test_methods_that_look_inside_the_forward_train_on_separate_pairs(tmp_path, tiny_bert_dir, method):
    """peft's EVA reads the layer inputs by token position: with separate pairs the layers see split rows."""
    from rankwise.training import train

    data = _pairs(tmp_path / "pairs", 32)
    res = train(tiny_bert_dir, data, pair_encoding="separate", method=method, budget_rank=4, max_steps=2,
                out=tmp_path / "run", progress=False)
    assert res["train_info"]["steps"] == 2 and res["eval"]["eval_loss"] > 0

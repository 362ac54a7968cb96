"""Data loading and detection: columns, label types, label maps, single-file splits, plain text, bad input."""

from __future__ import annotations

import pytest

from rankwise.training.data import detect_columns, label_info, load_splits, subsample
from rankwise.training.prepare import read_data, resolve_model_path
from rankwise.types import RankwiseError
from test_training_fixtures import write_csv, write_jsonl


@pytest.mark.parametrize("cols,texts,label", [
    (["sentence", "label", "idx"], ["sentence"], "label"),
    (["sentence1", "sentence2", "label"], ["sentence1", "sentence2"], "label"),
    (["question", "passage", "labels"], ["question", "passage"], "labels"),
    (["premise", "hypothesis", "label"], ["premise", "hypothesis"], "label"),
    (["sentiment", "confidence", "text"], ["text"], "sentiment"),
    (["text", "score"], ["text"], "score"),
])
def test_detect_columns(cols, texts, label):
    assert detect_columns(cols) == ("table", texts, label)


def test_detect_instruction_and_explicit_columns():
    assert detect_columns(["instruction", "input", "output", "idx"])[0] == "instruction"
    assert detect_columns(["a", "b", "y2"], ["a", "b"], "y2") == ("table", ["a", "b"], "y2")
    with pytest.raises(RankwiseError, match="unknown column 'nope'"):
        detect_columns(["text", "label"], label_column="nope")
    with pytest.raises(RankwiseError, match="no text column"):
        detect_columns(["foo", "label"])


def _splits(tmp_path, labels, name="d.jsonl"):
    rows = [{"text": f"t{i}", "label": v} for i, v in enumerate(labels)]
    return load_splits(write_jsonl(tmp_path / name, rows), validation_split=0.25)[0]


def test_label_types(tmp_path):
    ints = label_info(_splits(tmp_path, [0, 1, 2, 1] * 3, "i.jsonl"), "label")
    assert ints == {"label_type": "class", "num_labels": 3, "id2label": None}
    floats = label_info(_splits(tmp_path, [0.5, 4.2, 3.0, 1.0] * 3, "f.jsonl"), "label")
    assert floats["label_type"] == "regression" and floats["num_labels"] == 1
    strings = label_info(_splits(tmp_path, ["pos", "neg", "neutral", "pos"] * 3, "s.jsonl"), "label")
    assert strings["id2label"] == {0: "neg", 1: "neutral", 2: "pos"}
    assert strings["label2id"] == {"neg": 0, "neutral": 1, "pos": 2}


def test_mixed_label_column_is_one_line_error(tmp_path):
    with pytest.raises(RankwiseError) as e:
        label_info(_splits(tmp_path, [1, "pos", 0, "neg"] * 3, "m.jsonl"), "label")
    assert "\n" not in str(e.value)
    csv = write_csv(tmp_path / "m.csv", ["text", "label"], [[f"t{i}", v] for i, v in enumerate(["1", "pos"] * 6)])
    with pytest.raises(RankwiseError, match="mixes numbers"):
        label_info(load_splits(csv)[0], "label")


def test_single_file_split_is_seeded(tmp_path):
    f = write_csv(tmp_path / "one.csv", ["text", "label"], [[f"t{i}", i % 2] for i in range(40)])
    a, kind = load_splits(f, validation_split=0.25, seed=3)
    b, _ = load_splits(f, validation_split=0.25, seed=3)
    assert kind == "table" and len(a["train"]) == 30 and len(a["validation"]) == 10
    assert a["validation"]["text"] == b["validation"]["text"]


def test_folder_with_tsv_and_latin1_csv(tmp_path):
    d = tmp_path / "folder"
    d.mkdir()
    (d / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"s{i}\t{i % 2}\n" for i in range(8)))
    (d / "dev.tsv").write_text("sentence\tlabel\nx\t0\ny\t1\n")
    splits, kind = load_splits(d)
    assert kind == "table" and len(splits["train"]) == 8 and len(splits["validation"]) == 2
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,sentiment\n".encode() + "".join(f"caf\xe9 {i},pos\n" for i in range(5)).encode("latin-1")
                      + b"bad,neg\n" * 5)
    prepared = read_data(latin)
    assert prepared.info.text_columns == ["text"] and prepared.info.label_column == "sentiment"


def test_plain_text_split_is_the_tail(tmp_path):
    f = tmp_path / "book.txt"
    f.write_text("".join(f"line {i}\n" for i in range(20)))
    splits, kind = load_splits(f, validation_split=0.1)
    assert kind == "text" and splits["validation"]["text"] == ["line 18", "line 19"]
    assert read_data(f).info.kind == "text"


def test_subsample_is_random_not_head(tmp_path):
    splits = _splits(tmp_path, [0] * 50 + [1] * 50)
    sub = subsample(splits["train"], 20, seed=0)
    assert len(sub) == 20 and len(set(sub["label"])) == 2


@pytest.mark.parametrize("make,match", [
    (lambda p: p / "missing.jsonl", "does not exist"),
    (lambda p: (p / "empty.csv").write_text("") and None or p / "empty.csv", "is empty"),
    (lambda p: p / "nothing-here", "does not exist"),
    (lambda p: (p / "d").mkdir() or p / "d", "no train file"),
])
def test_bad_data_paths(tmp_path, make, match):
    with pytest.raises(RankwiseError, match=match):
        load_splits(make(tmp_path))


def test_missing_model_path():
    with pytest.raises(RankwiseError, match="does not exist"):
        resolve_model_path("/no/such/model")
    with pytest.raises(RankwiseError, match="does not exist"):
        resolve_model_path("not-an-alias")


def test_real_data_detection(shared_data):
    for name, texts, label_type in [("sst2", ["sentence"], "class"), ("rte", ["sentence1", "sentence2"], "class"),
                                    ("stsb", ["sentence1", "sentence2"], "regression")]:
        prepared = read_data(shared_data / name)
        assert prepared.info.text_columns == texts
        assert label_info(prepared.splits, "label")["label_type"] == label_type
    assert read_data(shared_data / "alpaca_libre").info.kind == "instruction"
    assert read_data(shared_data / "tinyshakespeare").info.kind == "text"


def test_hub_id_offline_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RankwiseError, match="no local folder or file") as e:
        load_splits("nyu-mll/glue:sst2")
    assert "\n" not in str(e.value)


def test_integer_labels_off_zero_are_mapped_not_padded(tmp_path):
    """Labels {1, 2} or {0, 5} would otherwise train empty classes 0 (or 1..4)."""
    info = label_info(_splits(tmp_path, [1, 2, 2, 1] * 3, "one_two.jsonl"), "label")
    assert info["num_labels"] == 2 and info["label2id"] == {"1": 0, "2": 1}
    gap = label_info(_splits(tmp_path, [0, 5, 5, 0] * 3, "gap.jsonl"), "label")
    assert gap["num_labels"] == 2 and gap["id2label"] == {0: "0", 1: "5"}

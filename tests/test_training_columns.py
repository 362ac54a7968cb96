"""Data read the way a person reads it (issue 7, item 4): columns by content, whole-number floats as classes, empty
texts named or dropped, the label never fed as input, class names, and a train+test folder's `test` split.

Every expectation is written down from the hand-made data (which column a person would call the label, which rows
are empty), not taken from the code's output."""

from __future__ import annotations

import json
import re

import pytest

from rankwise.training.columns import decide_columns
from rankwise.training.data import label_info, load_splits
from rankwise.training.prepare import read_data
from rankwise.types import RankwiseError
from test_training_fixtures import sentences, tiny_bert_dir, write_csv, write_jsonl  # noqa: F401

REVIEWS = ["the plot was thin but the actors carried it", "a warm and funny film for all ages",
           "two hours I will never get back", "stunning photography and a weak script",
           "my kids loved every minute of it", "not as good as the first one", "an instant classic in my book",
           "boring from start to finish", "the soundtrack alone is worth it", "clumsy dialogue and no suspense"]


def _reviews(n=40):
    """Columns no rankwise list names: free text, a 1-5 star label, a unique product id, a unique vote count."""
    return [{"review_body": f"{REVIEWS[i % 10]} ({i})", "stars": 1 + i % 5, "product_id": f"B00{i:04d}",
             "helpful_votes": 100 + 7 * i} for i in range(n)]


def test_label_and_text_found_by_content(tmp_path, capsys):
    f = write_jsonl(tmp_path / "reviews.jsonl", _reviews())
    prepared = read_data(f)
    info = prepared.info
    assert info.text_columns == ["review_body"] and info.label_column == "stars"
    assert info.detected["text_columns"] == "content" and info.detected["label_column"] == "content"
    line = capsys.readouterr().err
    assert "'review_body'" in line and "'stars'" in line and "by content" in line


def test_two_free_text_columns_make_a_pair_and_string_labels(tmp_path):
    rows = [{"claim": f"{REVIEWS[i % 10]} number {i}", "evidence": f"{REVIEWS[(i + 3) % 10]} source {i}",
             "verdict": ["supported", "refuted"][i % 2]} for i in range(40)]
    prepared = read_data(write_jsonl(tmp_path / "claims.jsonl", rows))
    assert prepared.info.text_columns == ["claim", "evidence"] and prepared.info.label_column == "verdict"


def test_known_text_name_with_label_by_content(tmp_path):
    rows = [{"text": f"{REVIEWS[i % 10]} {i}", "polarity": bool(i % 2)} for i in range(40)]
    splits = load_splits(write_jsonl(tmp_path / "p.jsonl", rows), validation_split=0.25)[0]
    kind, texts, label, how = decide_columns(splits["train"])
    assert (texts, label) == (["text"], "polarity") and how == {"text_columns": "name", "label_column": "content",
                                                               "reasons": {"polarity": "2 distinct booleans"}}
    assert label_info(splits, "polarity")["id2label"] == {0: "False", 1: "True"}


def test_two_label_candidates_are_an_error_naming_both(tmp_path):
    rows = [{**r, "verified": bool(i % 3)} for i, r in enumerate(_reviews())]
    with pytest.raises(RankwiseError, match="'stars'.*'verified'.*--label-column") as e:
        read_data(write_jsonl(tmp_path / "r.jsonl", rows))
    assert "\n" not in str(e.value)
    assert read_data(write_jsonl(tmp_path / "r2.jsonl", rows), label_column="verified").info.label_column == "verified"


def test_repeated_review_sentences_are_text_and_the_short_column_is_the_label(tmp_path, capsys):
    """Issue 23's table: uid, remark_body (eight distinct reviews, 4 to 9 words, repeated over 60 rows), verdict
    (two words). A person reads remark_body as the text and verdict as the label; the decision is printed."""
    reviews = REVIEWS[:8]
    rows = [[1000 + i, reviews[i % 8], ["keep", "reject"][(i % 8) % 2]] for i in range(60)]
    f = write_csv(tmp_path / "remarks.csv", ["uid", "remark_body", "verdict"], rows)
    prepared = read_data(f)
    assert prepared.info.text_columns == ["remark_body"] and prepared.info.label_column == "verdict"
    assert label_info(prepared.splits, "verdict")["label2id"] == {"keep": 0, "reject": 1}
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if ln.startswith("columns:")]
    assert len(line) == 1 and "text 'remark_body' (free text" in line[0] and "label 'verdict' (2 distinct" in \
        line[0] and "by content" in line[0], err
    # two short categorical columns beside the text are still an error naming both, never a guess
    rows2 = [r + [["a", "b", "c"][i % 3]] for i, r in enumerate(rows)]
    g = write_csv(tmp_path / "two.csv", ["uid", "remark_body", "verdict", "grade"], rows2)
    with pytest.raises(RankwiseError, match="'verdict'.*'grade'.*--label-column"):
        read_data(g)


def test_whole_number_floats_are_classes(tmp_path):
    """0, 1, 1.0 in JSON (read as floats) and "1" / "1.0" in a CSV column with text are two classes, not a
    regression: class ids equal the numbers for 0/1, and "1" and "1.0" are the same class."""
    lab = label_info(load_splits(write_jsonl(tmp_path / "f.jsonl", [{"text": f"t{i}", "label": v} for i, v in
                                                                    enumerate([0, 1, 1.0, 0] * 5)]))[0], "label")
    assert lab["label_type"] == "class" and lab["num_labels"] == 2
    csv = write_csv(tmp_path / "s.csv", ["text", "label"], [[f"t{i}", v] for i, v in enumerate(["1", "1.0", "2"] * 6)])
    from rankwise.training.data import DataInfo
    from rankwise.training.tasks import _label_id

    lab = label_info(load_splits(csv)[0], "label")
    assert lab["num_labels"] == 2 and lab["label2id"] == {"1": 0, "2": 1}
    info = DataInfo(source="s", kind="table", label_type="class", num_labels=2, label2id=lab["label2id"])
    assert [_label_id(v, info) for v in ("1", "1.0", 1.0, 2, "2.0")] == [0, 0, 0, 1, 1]


def test_empty_texts_are_named_by_file_row(tmp_path):
    """Rows 3 and 7 (counting data rows from 1) are empty or missing; the single file is shuffled into train and
    validation, and the error still names the file's rows."""
    rows = [[f"{REVIEWS[i % 10]} {i}", i % 2] for i in range(20)]
    rows[2][0], rows[6][0] = "", "   "
    f = write_csv(tmp_path / "gaps.csv", ["sentence", "label"], rows)
    with pytest.raises(RankwiseError) as e:
        read_data(f, validation_split=0.5)
    msg = str(e.value)
    assert "\n" not in msg and "--drop-empty" in msg
    named = sorted(int(n) for part in re.findall(r"rows ([\d, ]+)", msg) for n in part.split(",") if n.strip())
    assert named == [3, 7]


def test_drop_empty_drops_and_counts(tmp_path):
    d = tmp_path / "folder"
    rows = [{"sentence": f"{REVIEWS[i % 10]} {i}", "label": i % 2} for i in range(20)]
    rows[4]["sentence"] = None
    rows[9]["label"] = None
    write_jsonl(d / "train.jsonl", rows)
    write_jsonl(d / "validation.jsonl", [{"sentence": "", "label": 0}, {"sentence": "fine", "label": 1}])
    with pytest.raises(RankwiseError, match=r"train rows 5, 10; validation rows 1"):
        read_data(d)
    prepared = read_data(d, drop_empty=True)
    assert len(prepared.splits["train"]) == 18 and prepared.splits["validation"]["sentence"] == ["fine"]
    assert prepared.info.dropped_empty == {"train": 2, "validation": 1}


def test_label_column_among_text_columns_is_an_error(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": f"t {i}", "label": i % 2} for i in range(10)])
    with pytest.raises(RankwiseError, match="'label'.*--text-columns.*own answer"):
        read_data(f, text_columns=["text", "label"])
    with pytest.raises(RankwiseError, match="label column 'text' is also in --text-columns"):
        read_data(f, text_columns=["text"], label_column="text")


def test_label_names(tmp_path):
    ints = load_splits(write_jsonl(tmp_path / "i.jsonl", [{"text": f"t{i}", "label": i % 3} for i in range(30)]))[0]
    assert label_info(ints, "label", ["world", "sports", "business"])["id2label"] == \
        {0: "world", 1: "sports", 2: "business"}
    with pytest.raises(RankwiseError, match="gives 2 names but 'label' has 3 classes"):
        label_info(ints, "label", ["a", "b"])
    strings = load_splits(write_jsonl(tmp_path / "s.jsonl", [{"text": f"t{i}", "label": "ab"[i % 2]}
                                                             for i in range(20)]))[0]
    with pytest.raises(RankwiseError, match="already holds names"):
        label_info(strings, "label", ["x", "y"])
    floats = load_splits(write_jsonl(tmp_path / "f.jsonl", [{"text": f"t{i}", "label": i / 7} for i in range(20)]))[0]
    with pytest.raises(RankwiseError, match="regression"):
        label_info(floats, "label", ["x", "y"])


def test_classlabel_names_are_kept(tmp_path):
    import datasets

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["World", "Sports", "Business", "Sci/Tech"])})
    ds = datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(12)], "label": [i % 4 for i in range(12)]},
                                    features=features)
    d = tmp_path / "news"
    d.mkdir()
    ds.to_parquet(str(d / "train.parquet"))
    ds.to_parquet(str(d / "test.parquet"))
    prepared = read_data(d)
    assert label_info(prepared.splits, "label")["id2label"] == {0: "World", 1: "Sports", 2: "Business", 3: "Sci/Tech"}
    assert prepared.info.eval_split == "test"


def test_unnamed_columns_train_and_predict_names(tmp_path, tiny_bert_dir, capsys):
    """Without any column flag: review_body/stars found by content, --label-names shown by predict, a train+test
    folder reports `test`, and all of it is saved in results.json and task.json."""
    from rankwise.cli import main

    d = tmp_path / "shop"
    rows = [{"review_body": t, "stars": 4 + y, "product_id": f"B{i:05d}"} for i, (t, y) in enumerate(sentences(32))]
    write_jsonl(d / "train.jsonl", rows)
    write_jsonl(d / "test.jsonl", rows[:8])
    out = tmp_path / "run"
    rc = main(["train", str(tiny_bert_dir), "--data", str(d), "--rank", "2", "--max-steps", "2", "--batch-size", "4",
               "--max-length", "32", "--device", "cpu", "--label-names", "meh,great", "--out", str(out), "-q"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "'review_body'" in cap.err and "'stars'" in cap.err
    summary = json.loads(cap.out)
    assert summary["eval"]["split"] == "test" and summary["eval"]["num_samples"] == 8
    results = json.loads((out / "results.json").read_text())
    saved = json.loads((out / "task.json").read_text())["data"]
    assert results["run_info"]["data_info"] == saved
    assert saved["text_columns"] == ["review_body"] and saved["label_column"] == "stars"
    assert saved["detected"]["label_column"] == "content" and saved["label2id"] == {"4": 0, "5": 1}
    assert saved["id2label"] == {"0": "meh", "1": "great"} and results["run_info"]["hparams"]["label_names"] == \
        ["meh", "great"]
    assert main(["predict", str(out), "--text", "a great film"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["label"] in ("meh", "great")

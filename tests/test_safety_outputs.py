"""Every `--out` is safe (issue 23, item 3): an output file is never an input of the same command, never a file of
the user's without --overwrite; sweep and report folders follow the folder rule; files keep the user's umask.

Each destructive case of the issue is run through the CLI: one line on stderr, exit 2, and the input it would
have destroyed is byte-for-byte what it was. Expected modes are computed by hand from the umask (0o027 -> files
0o640, folders 0o750), not read from the code."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from rankwise.cli import main
from rankwise.outputs import check_folder_out, file_written_by_rankwise
from rankwise.types import RankwiseError
from test_training_fixtures import save_tiny_bert, sentences, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
UMASK = 0o027  # not the usual 022, so a mode that merely happens to be 644 cannot pass


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from conftest import minilm_path, missing

    tok = minilm_path()
    if tok is None:
        missing("MiniLM not installed (its tokenizer serves the tiny models): make install")
    root = tmp_path_factory.mktemp("safety")
    model = save_tiny_bert(root / "model", tok)
    data = write_jsonl(root / "d.jsonl", [{"text": t, "label": y} for t, y in sentences(24)])
    ev = write_jsonl(root / "ev.jsonl", [{"text": t, "label": y} for t, y in sentences(6, seed=1)])
    run = root / "run"
    old = os.umask(UMASK)
    try:
        code = main(["train", str(model), "--data", str(data), "--rank", "2", "--max-steps", "1", "--batch-size",
                     "8", "--max-length", "16", "--out", str(run), "-q", "--device", "cpu"])
    finally:
        os.umask(old)
    assert code == 0
    return {"root": root, "model": model, "data": data, "ev": ev, "run": run}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _refused(argv, capsys, *words) -> str:
    """Run argv; it must fail with exit 2 and one stderr line containing `words`."""
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, (w, err)
    return err


# ----- output files: never an input ----------------------------------------------------------------------------
def test_analyze_out_onto_the_model_it_reads(world, capsys):
    weights = world["model"] / "model.safetensors"
    before = _digest(weights)
    _refused(["analyze", str(world["model"]), "-q", "--out", str(weights)], capsys, "refusing --out", "reads")
    _refused(["analyze", str(world["model"]), "-q", "--out", str(world["model"] / "stats.csv")], capsys,
             "lies inside")  # a new file inside the model folder could be read as part of it
    assert _digest(weights) == before


def test_analyze_out_onto_its_data(world, tmp_path, capsys):
    data = shutil.copy(world["data"], tmp_path / "d.jsonl")
    before = _digest(Path(data))
    _refused(["analyze", str(world["model"]), "-q", "--data", str(data), "--out", str(data)], capsys,
             "refusing --out", "which this command reads")
    assert _digest(Path(data)) == before


def test_eval_out_onto_its_data_or_its_run(world, tmp_path, capsys):
    ev = Path(shutil.copy(world["ev"], tmp_path / "ev.jsonl"))
    before = _digest(ev)
    _refused(["eval", str(world["run"]), "--data", str(ev), "-q", "--out", str(ev)], capsys, "refusing --out")
    assert _digest(ev) == before
    adapter = world["run"] / "adapter_model.safetensors"
    before = _digest(adapter)
    _refused(["eval", str(world["run"]), "--data", str(ev), "-q", "--out", str(adapter)], capsys,
             "refusing --out", str(world["run"]))
    assert _digest(adapter) == before
    # the base model the run reads is an input too
    _refused(["eval", str(world["run"]), "--data", str(ev), "-q", "--out", str(world["model"] / "config.json")],
             capsys, "refusing --out")


# ----- output files: a file of the user's only with --overwrite -----------------------------------------------
def test_users_file_needs_overwrite_and_rankwise_files_are_replaced(world, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("notes.txt").write_text("my notes\n")
    _refused(["analyze", str(world["model"]), "-q", "--out", "notes.txt"], capsys, "rankwise did not write it",
             "--overwrite")
    assert Path("notes.txt").read_text() == "my notes\n"
    # a stats file rankwise wrote is replaced without --overwrite (re-running a command is ordinary)
    for fmt in ("csv", "json", "table"):
        assert main(["analyze", str(world["model"]), "-q", "--format", fmt, "--out", f"stats.{fmt}"]) == 0
        assert file_written_by_rankwise(f"stats.{fmt}")
        assert main(["analyze", str(world["model"]), "-q", "--format", fmt, "--out", f"stats.{fmt}"]) == 0
    rows = json.loads(Path("stats.json").read_text())
    assert len(rows) == 12  # 2 layers x (q, k, v, attention output, intermediate, output) in the tiny BERT
    # eval's metrics file: rankwise's, replaced on a re-run; a user's JSON is refused without --overwrite
    assert main(["eval", str(world["run"]), "--data", str(world["ev"]), "-q", "--out", "m.json"]) == 0
    assert json.loads(Path("m.json").read_text())["num_samples"] == 6
    assert main(["eval", str(world["run"]), "--data", str(world["ev"]), "-q", "--out", "m.json"]) == 0
    Path("mine.json").write_text('{"budget": 3}\n')
    capsys.readouterr()
    _refused(["eval", str(world["run"]), "--data", str(world["ev"]), "-q", "--out", "mine.json"], capsys,
             "rankwise did not write it")
    capsys.readouterr()
    assert main(["analyze", str(world["model"]), "-q", "--out", "notes.txt", "--overwrite"]) == 0
    assert Path("notes.txt").read_text().split()[:2] == ["name", "shape"]


# ----- folders: report and sweep -------------------------------------------------------------------------------
def _sweep_of(world, root: Path) -> Path:
    """A folder of one finished run, as `rankwise report` reads it without a sweep.json."""
    shutil.copytree(world["run"], root / "runs" / "r1")
    return root


def test_report_never_replaces_a_users_report_nor_writes_into_cwd(world, tmp_path, capsys, monkeypatch):
    sweep = _sweep_of(world, tmp_path / "sweep")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "report.md").write_text("# my own report\n")
    _refused(["report", str(sweep), "--out", str(notes), "--no-figures"], capsys, "files rankwise did not write")
    assert (notes / "report.md").read_text() == "# my own report\n" and sorted(os.listdir(notes)) == ["report.md"]
    monkeypatch.chdir(notes)
    _refused(["report", str(sweep), "--out", ".", "--no-figures"], capsys, "current directory")
    _refused(["report", str(sweep), "--out", "..", "--no-figures"], capsys, "ancestor of the current directory")
    assert sorted(os.listdir(notes)) == ["report.md"] and not (tmp_path / "report.md").exists()
    # a new folder is written, and written again (its own cells.json marks it as a report folder)
    out = tmp_path / "rep"
    for _ in range(2):
        assert main(["report", str(sweep), "--out", str(out), "--no-figures"]) == 0
    assert {"report.md", "cells.json", "tables.tex"} <= set(os.listdir(out))


def test_sweep_never_writes_among_the_users_files(tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "thesis.tex").write_text("mine")
    exp = work / "exp.yaml"
    exp.write_text("name: x\n")  # the folder is checked before the experiment is read
    monkeypatch.chdir(work)
    _refused(["sweep", "exp.yaml", "--out", ".."], capsys, "ancestor of the current directory")
    _refused(["sweep", "exp.yaml", "--out", "."], capsys, "current directory")
    assert sorted(os.listdir(tmp_path)) == ["thesis.tex", "work"] and os.listdir(work) == ["exp.yaml"]
    (work / "mine").mkdir()
    (work / "mine" / "data.csv").write_text("a,b\n")
    _refused(["sweep", "exp.yaml", "--out", "mine"], capsys, "not a sweep folder")
    _refused(["sweep", "exp.yaml", "--out", "exp.yaml"], capsys, "existing file")
    assert os.listdir(work / "mine") == ["data.csv"]


def test_committed_study_folders_are_their_kind():
    """The study's own commands (`sweep ... --out studies/glue-minilm`, `report ... --out .../report`) still run:
    those folders hold the user's experiment.yaml beside sweep.json, which the folder rule allows for a sweep."""
    for study in ("glue-minilm", "smollm2-alpaca"):
        folder = ROOT / "studies" / study
        assert check_folder_out(folder, "sweep") == folder
        assert check_folder_out(folder / "report", "report") == folder / "report"
        with pytest.raises(RankwiseError, match="not a report folder"):
            check_folder_out(folder, "report")


# ----- the user's umask, safetensors included -------------------------------------------------------------------
def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*")}


def test_run_export_and_stats_files_keep_the_umask(world, tmp_path, capsys):
    files, dirs = 0o640, 0o750  # 0o666 & ~0o027 and 0o777 & ~0o027, by hand
    modes = _modes(world["run"])
    assert modes["adapter_model.safetensors"] == files  # safetensors' save_file alone writes 0o600
    assert {k: v for k, v in modes.items() if (world["run"] / k).is_file() and v != files} == {}
    assert stat.S_IMODE(world["run"].stat().st_mode) == dirs
    old = os.umask(UMASK)
    try:
        assert main(["export", str(world["run"]), "--out", str(tmp_path / "exp"), "-q"]) == 0
        assert main(["analyze", str(world["model"]), "-q", "--out", str(tmp_path / "s.csv")]) == 0
    finally:
        os.umask(old)
    assert _modes(tmp_path / "exp")["adapter_model.safetensors"] == files
    assert stat.S_IMODE((tmp_path / "s.csv").stat().st_mode) == files

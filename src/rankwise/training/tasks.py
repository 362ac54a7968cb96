"""Tasks: which head, how rows become token ids, and how batches are padded.

`seq-cls` tokenizes one or two text columns and maps labels to ids (or floats for regression).
`causal-lm` either formats Alpaca rows with a prompt template and masks the prompt out of the loss, or packs plain
text into blocks of `max_length` tokens (no padding waste, every token is a target).
"""

from __future__ import annotations

import sys

from safetensors import SafetensorError

from ..types import RankwiseError
from .data import DataInfo, label_key

__all__ = [
    "TASKS",
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "infer_task",
    "format_prompt",
    "load_tokenizer",
    "load_model",
    "max_length_for",
    "encode_classification",
    "encode_instructions",
    "encode_text_blocks",
    "collator",
    "TruncationNotice",
]

TASKS = ("auto", "seq-cls", "causal-lm")
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta", "deberta-v2", "albert",
                  "camembert", "mpnet", "ernie")


def infer_task(task: str, kind: str, has_label: bool, config) -> str:
    """`auto` -> seq-cls when the data has labels, causal-lm for instructions/plain text or a decoder-only model."""
    if task not in TASKS:
        raise RankwiseError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    if task == "auto":
        if kind in ("text", "instruction"):
            _check_lm_head(config)
            return "causal-lm"
        if has_label:
            return "seq-cls"
        archs = getattr(config, "architectures", None) or []
        if any(a.endswith(_CAUSAL_SUFFIXES) for a in archs):
            return "causal-lm"
        raise RankwiseError("cannot infer the task: the data has no label column and the model is not a causal "
                            "LM; give --label-column or --task")
    if task == "seq-cls" and not has_label:
        raise RankwiseError("--task seq-cls needs a label column (label, labels, sentiment, score...); "
                            "name it with --label-column")
    if task == "causal-lm":
        _check_lm_head(config)
    return task


def _check_lm_head(config) -> None:
    """causal-lm needs a checkpoint with a trained language-modelling head: on an encoder (BERT, MiniLM) the head
    would be new and random, and LoRA alone cannot learn it, so the run would finish having learned nothing."""
    archs = list(getattr(config, "architectures", None) or [])
    if archs and not any(a.endswith(_CAUSAL_SUFFIXES) for a in archs):
        raise RankwiseError(f"--task causal-lm needs a model with a language-modelling head; this one is "
                            f"{', '.join(archs)} ({getattr(config, 'model_type', '?')}), which has none; use a "
                            "decoder such as smollm2, or --task seq-cls with a label column")
    if not archs and getattr(config, "model_type", None) in _ENCODER_TYPES:
        raise RankwiseError(f"--task causal-lm needs a model with a language-modelling head; "
                            f"{config.model_type!r} is an encoder; use a decoder such as smollm2")


def format_prompt(row: dict) -> str:
    """The Alpaca prompt for one row (the `input` section only when the row has one)."""
    if str(row.get("input") or "").strip():
        return ALPACA_PROMPT.format(instruction=row["instruction"], input=row["input"])
    return ALPACA_PROMPT_NO_INPUT.format(instruction=row["instruction"])


# ----- model and tokenizer ------------------------------------------------------------------------------------
def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise RankwiseError(f"could not load a tokenizer from {path}: {str(e).splitlines()[0][:200]}") from None
    if tok.pad_token is None:  # decoder-only tokenizers ship without one; padding is masked out anyway
        tok.pad_token = tok.eos_token or tok.sep_token
    return tok


def load_model(path: str, task: str, info: DataInfo | None = None, dtype=None, quantization=None,
               device: str | None = None):
    """The base model with the task's head; a classification head is told its labels and problem type.

    `quantization` (a `quantize.QuantSpec`) loads the linear layers quantised by bitsandbytes onto `device`,
    the heads kept in float (QLoRA); None loads full precision."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs = {"dtype": dtype} if dtype is not None else {}
    if quantization is not None:
        from .quantize import load_kwargs

        kwargs.update(load_kwargs(quantization, path, task, device))
    try:
        if task == "causal-lm":
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        else:
            assert info is not None
            problem = "regression" if info.label_type == "regression" else "single_label_classification"
            id2label = info.id2label or {i: f"LABEL_{i}" for i in range(info.num_labels)}
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=info.num_labels, problem_type=problem, id2label=id2label,
                label2id={v: k for k, v in id2label.items()}, **kwargs,
            )
    except SafetensorError as e:  # truncated or corrupt weights file: bad input, one line
        raise RankwiseError(f"model {path} has a corrupt or truncated safetensors file ({e}); re-download or "
                            "re-save it") from None
    except (OSError, ValueError, ImportError, RuntimeError, NotImplementedError, TypeError) as e:
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        if quantization is not None and not isinstance(e, OSError):
            raise RankwiseError(f"bitsandbytes could not quantise {path} to {quantization.label}: {first}") from None
        if not isinstance(e, (OSError, ValueError)):
            raise
        raise RankwiseError(f"could not load model {path}: {first}") from None
    if quantization is not None:
        from .quantize import check_quantized, same_kernels

        check_quantized(model, quantization, path)
        same_kernels(model)
    return model


def max_length_for(tokenizer, config, max_length: int | None, default: int = 512) -> int:
    """Tokens per example: `max_length` (or `default`), capped by what the model's positions allow."""
    limits = [getattr(config, "max_position_embeddings", None), getattr(config, "n_positions", None)]
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if tok_limit and tok_limit < 10**7:  # tokenizers without a limit report a huge sentinel
        limits.append(tok_limit)
    limit = min((x for x in limits if x), default=None)
    want = max_length or default
    if limit and want > limit:
        if max_length:
            print(f"note: --max-length {max_length} is more than the model allows; using {limit}", file=sys.stderr)
        return limit
    return want


class TruncationNotice:
    """Say once per run that texts were cut, and how many (silently truncating hides lost signal)."""

    def __init__(self, max_length: int):
        self.max_length, self.count, self.said = max_length, 0, False

    def add(self, n: int) -> None:
        self.count += n

    def report(self, what: str) -> None:
        if self.count and not self.said:
            print(f"note: {self.count} {what} longer than {self.max_length} tokens were truncated "
                  "(raise --max-length to keep more)", file=sys.stderr)
            self.said = True


# ----- encoders -----------------------------------------------------------------------------------------------
def _map(ds, fn):
    """`ds.map(fn)` (batched, source columns dropped) without datasets' fingerprint. Hashing `fn` pickles the
    tokenizer it closes over (about 0.9 s per call on MiniLM's, the largest cost of a warm sweep run after
    training); a fresh fingerprint with the result kept in memory writes and reads no cache file, so no cache can
    answer for a different tokenizer or setting, and the truncation count is taken on every run."""
    import uuid

    return ds.map(fn, batched=True, remove_columns=ds.column_names, desc="tokenizing", keep_in_memory=True,
                  load_from_cache_file=False, new_fingerprint=uuid.uuid4().hex)


def encode_classification(ds, tokenizer, info: DataInfo, max_length: int, notice: TruncationNotice | None = None,
                          pair_encoding: str = "joint"):
    """Rows -> input_ids/attention_mask(/token_type_ids) + labels (class ids or floats); other columns dropped.
    `pair_encoding="separate"`: each sentence of a pair truncated and encoded on its own (training/pairs.py)."""
    cols = info.text_columns

    def encode(batch):
        texts = [batch[cols[0]]] + ([batch[cols[1]]] if len(cols) > 1 else [])
        texts = [[str(t) if t is not None else "" for t in col] for col in texts]
        if len(cols) > 2:  # three or more columns: join the rest into the second segment
            texts = [texts[0], [" ".join(parts) for parts in zip(*texts[1:])]]
        if notice is not None:
            full = [tokenizer(t, truncation=False)["input_ids"] for t in texts] if pair_encoding == "separate" \
                else [tokenizer(*texts, truncation=False)["input_ids"]]
            notice.add(sum(any(len(ids) > max_length for ids in row) for row in zip(*full)))
        if pair_encoding == "separate":
            from .pairs import encode_separately

            enc = encode_separately(tokenizer, texts[0], texts[1], max_length)
        else:
            enc = tokenizer(*texts, truncation=True, max_length=max_length)
        if info.label_column and info.label_column in batch:
            enc["labels"] = [_label_id(v, info) for v in batch[info.label_column]]
        return enc

    out = _map(ds, encode)
    if notice is not None:
        notice.report("texts")
    return out


def _label_id(value, info: DataInfo):
    if info.label_type == "regression":
        try:
            return float(value)
        except (TypeError, ValueError):
            raise RankwiseError(f"label {value!r} is not a number, but the run is a regression (numeric "
                                "labels)") from None
    if info.label2id is not None:
        key = str(value) if str(value) in info.label2id else label_key(value)  # 1.0 and "1" are class "1"
        if key not in info.label2id:
            raise RankwiseError(f"label {value!r} was not in the training labels {sorted(info.label2id)}")
        return info.label2id[key]
    try:
        v = int(value)
        if v != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise RankwiseError(f"label {value!r} is not an integer class id, but the run was trained on integer "
                            f"labels 0..{info.num_labels - 1}; give data with the same labels") from None
    if not 0 <= v < info.num_labels:
        raise RankwiseError(f"label {v} is outside the trained classes 0..{info.num_labels - 1}")
    return v


def _eos(tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    return [] if eos is None else [eos]


def encode_instructions(ds, tokenizer, max_length: int, notice: TruncationNotice | None = None):
    """Alpaca rows -> prompt + response + EOS; labels are -100 on the prompt so only the response is learned."""

    def encode(batch):
        rows = [dict(zip(batch, vals)) for vals in zip(*batch.values())]
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for row in rows:
            prompt = tokenizer(format_prompt(row), add_special_tokens=True)["input_ids"]
            answer = tokenizer(str(row["output"]).strip(), add_special_tokens=False)["input_ids"] + _eos(tokenizer)
            ids = (prompt + answer)[:max_length]
            if notice is not None and len(prompt) + len(answer) > max_length:
                notice.add(1)
            labels = ([-100] * len(prompt) + answer)[:max_length]
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append(labels)
        return out

    enc = _map(ds, encode)
    # A prompt that fills max_length leaves no response token to learn from: drop it rather than train on nothing.
    enc = enc.filter(lambda ex: any(t != -100 for t in ex["labels"]), desc="dropping prompt-only rows")
    if notice is not None:
        notice.report("examples")
    if len(enc) == 0:
        raise RankwiseError(f"every prompt is longer than --max-length {max_length}; raise it")
    return enc


def encode_text_blocks(ds, tokenizer, max_length: int, column: str = "text"):
    """Plain text -> one token stream (EOS between documents/lines kept as written) cut into full blocks."""
    eos = _eos(tokenizer)

    def tok(batch):
        # Lines from the text loader lose their newline; put it back so the model sees real line structure.
        return {"ids": [tokenizer(t + "\n", add_special_tokens=False)["input_ids"] for t in batch[column]]}

    ids = _map(ds, tok)
    stream = [t for row in ids["ids"] for t in row] + eos
    n_blocks = len(stream) // max_length
    if n_blocks == 0:
        raise RankwiseError(f"the text has {len(stream)} tokens, fewer than one block of --max-length {max_length}")
    blocks = [stream[i * max_length:(i + 1) * max_length] for i in range(n_blocks)]
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * max_length] * n_blocks,
                              "labels": blocks})


def collator(task: str, tokenizer):
    """Dynamic padding: labels padded with -100 for causal LM (ignored by the loss), plain padding otherwise."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    if task == "causal-lm":
        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)
    return DataCollatorWithPadding(tokenizer)

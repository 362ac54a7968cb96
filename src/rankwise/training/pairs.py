"""Sentence pairs encoded separately (`--pair-encoding separate`): a bi-encoder head for sentence-embedding models.

`joint` (the default) is BERT's cross-encoder: `[CLS] a [SEP] b [SEP]` in one sequence, classified from the pooler.
Sentence-transformers checkpoints (all-MiniLM-L6-v2 among them) were trained the other way: each sentence is encoded
alone, mean-pooled and L2-normalised, and pairs are compared by cosine similarity. On RTE that matters: the cosine
of the untouched model's embeddings, thresholded, scores 0.62 on validation, while full fine-tuning as a
cross-encoder reaches 0.53-0.59 (docs/study.md).

`separate` keeps the model, the head and every module name as they are (so plans, peft keys and adapters are
unchanged) and changes two things:
- encoding: each example is `[CLS] a [SEP]` then `[CLS] b [SEP]` in one row, `token_type_ids` 0 on the first
  sentence and 1 on the second (each sentence truncated to max_length on its own), so the usual padding collator
  and length grouping work;
- the forward: the row is split back into its two sentences, both are encoded in one batch (positions from 0,
  token types 0, as the model was trained), mean-pooled and normalised to u and v, and the classifier's first
  input is `SCALE * cos(u, v)`, its second the constant `SCALE`, the others 0: logits = SCALE * (cos * W[:, 0] +
  W[:, 1]) + b, a one-feature logistic (or linear) regression on the cosine. SCALE = 20 (as sentence-transformers
  scales cosines in its ranking loss) lets Adam, which moves each weight about lr per step, reach a useful slope
  and threshold within an epoch; copying the cosine into every input instead made the slope move 192 times
  faster than that and oscillate (a frozen-encoder check on RTE: 0.62 after one epoch, 0.47 after three).
  The head starts fitted (linear probing, then fine-tuning: Kumar et al. 2022, "Fine-tuning can distort
  pretrained features"): before the first step, `fit_head` regresses the training labels on the untouched
  model's cosines. Started at zero instead, the head hardly moved while LoRA changed the encoder under it: on RTE
  uniform LoRA at r=16 predicted one class after each of 3 epochs, while the same head on frozen embeddings
  learns the 0.62 of the cosine within an epoch.
  The head sees nothing but the cosine on purpose: on RTE a logistic regression over (u, v, |u - v|, u * v) of
  the untouched model scores 0.57-0.59 on validation, the cosine alone 0.62 (2,490 pairs are too few for 1,536
  features), and a head over `u * v` trained with LoRA scored 0.48 after one epoch.
"""

from __future__ import annotations

from ..types import RankwiseError

__all__ = ["PAIR_ENCODINGS", "SCALE", "check_pair_encoding", "encode_separately", "separate_pairs", "split_pairs",
           "fit_head"]

PAIR_ENCODINGS = ("joint", "separate")
SCALE = 20.0


def check_pair_encoding(value: str, text_columns=None) -> str:
    if value not in PAIR_ENCODINGS:
        raise RankwiseError(f"--pair-encoding must be one of {', '.join(PAIR_ENCODINGS)}, got {value!r}")
    if value == "separate" and text_columns is not None and len(text_columns) != 2:
        raise RankwiseError(f"--pair-encoding separate needs exactly two text columns (a sentence pair); the "
                            f"data's text columns are {list(text_columns)}")
    return value


def encode_separately(tokenizer, first, second, max_length: int) -> dict:
    """Two lists of texts -> rows `[CLS] a [SEP] [CLS] b [SEP]` with token_type_ids 0 then 1."""
    a = tokenizer(list(first), truncation=True, max_length=max_length)["input_ids"]
    b = tokenizer(list(second), truncation=True, max_length=max_length)["input_ids"]
    return {"input_ids": [x + y for x, y in zip(a, b)],
            "token_type_ids": [[0] * len(x) + [1] * len(y) for x, y in zip(a, b)],
            "attention_mask": [[1] * (len(x) + len(y)) for x, y in zip(a, b)]}


def split_pairs(input_ids, attention_mask, token_type_ids):
    """(ids, mask) of shape [2B, L]: the first sentences then the second ones, each left-aligned and padded."""
    import torch

    real = attention_mask.bool()
    first = real & (token_type_ids == 0)
    len_a, len_b = first.sum(1), (real & (token_type_ids == 1)).sum(1)
    if bool((len_a == 0).any() or (len_b == 0).any()):
        raise RankwiseError("--pair-encoding separate: a row has no second sentence (token_type_ids 1); encode "
                            "the data with the same --pair-encoding")
    width = int(max(len_a.max(), len_b.max()))
    pos = torch.arange(width, device=input_ids.device).unsqueeze(0)
    # the second sentence starts where the first ends: shift it to position 0 by gathering from len_a on
    idx_b = (len_a.unsqueeze(1) + pos).clamp(max=input_ids.shape[1] - 1)
    ids_a = input_ids[:, :width]  # a row holds both sentences, so it is never narrower than the longer one
    mask_a, mask_b = pos < len_a.unsqueeze(1), pos < len_b.unsqueeze(1)
    ids = torch.cat([ids_a * mask_a, torch.gather(input_ids, 1, idx_b) * mask_b])
    return ids, torch.cat([mask_a, mask_b]).long()


def _loss(model, logits, labels):
    """The loss BertForSequenceClassification computes, for the problem type the run set."""
    import torch.nn.functional as F

    kind = model.config.problem_type
    if kind == "regression":
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
    if kind == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))


def separate_pairs(model):
    """Give `model` (a BERT-style ...ForSequenceClassification: an encoder and one linear `classifier`) the
    separate-pairs forward; returns it. Its modules and names are untouched: only `model.forward` changes (an
    instance attribute, which peft's wrappers call through)."""
    import torch

    prefix = getattr(model, "base_model_prefix", "")
    encoder = getattr(model, prefix, None)
    head = getattr(model, "classifier", None)
    if encoder is None or not isinstance(head, torch.nn.Linear):
        raise RankwiseError(f"--pair-encoding separate supports BERT-style classifiers (an encoder and one linear "
                            f"classifier, e.g. bert, MiniLM); {type(model).__name__} is not one; use "
                            "--pair-encoding joint")
    width = head.in_features
    if width < 2:
        raise RankwiseError(f"--pair-encoding separate needs a classifier with at least 2 inputs; this one has {width}")
    del encoder, head

    def forward(input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **_ignored):
        from transformers.modeling_outputs import SequenceClassifierOutput

        if input_ids is None or token_type_ids is None or attention_mask is None:
            raise RankwiseError("--pair-encoding separate needs input_ids, attention_mask and token_type_ids")
        ids, mask = split_pairs(input_ids, attention_mask, token_type_ids)
        # looked up on every call: peft replaces the head with its trainable copy (modules_to_save) after this
        encoder, head = getattr(model, prefix), model.classifier
        hidden = encoder(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)
        u, v = pooled.chunk(2)
        cosine = (u * v).sum(-1, keepdim=True)
        features = torch.cat([cosine, torch.ones_like(cosine), cosine.new_zeros(len(cosine), width - 2)], -1)
        logits = head(SCALE * features)  # no dropout: it would only jitter the slope and the intercept
        loss = _loss(model, logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)

    model.forward = forward
    model.rankwise_pair_encoding = "separate"
    return model


def _cosines(model, dataset, collate, batch_size: int = 64):
    """(cosines, labels) of every row of `dataset`, in its order, under `model` in eval mode (no dropout, no
    gradients)."""
    import torch

    # Batches of rows of similar length: a batch pads every sentence to its longest one, and an unsorted batch of
    # 64 RTE pairs nearly always holds a premise at the length cap. Padding is masked, so the cosines are the same.
    rows = [dataset[j] for j in range(len(dataset))]  # read once: each row read from a datasets table decodes it
    order = sorted(range(len(rows)), key=lambda j: len(rows[j]["input_ids"]))
    was_training = model.training
    model.eval()
    captured, labels = [], []
    hook = model.classifier.register_forward_hook(lambda _m, inp, _out: captured.append(inp[0][:, 0] / SCALE))
    try:
        with torch.no_grad():
            for i in range(0, len(order), batch_size):
                batch = collate([rows[j] for j in order[i:i + batch_size]])
                labels.append(batch.pop("labels"))
                model(**batch)
    finally:
        hook.remove()
        model.train(was_training)
    back = torch.argsort(torch.tensor(order))  # the inverse permutation: row j's cosine sits at back[j]
    return torch.cat(captured).double()[back], torch.cat(labels)[back]


def fit_head(model, dataset, collate) -> dict:
    """Set the classifier to the regression of `dataset`'s labels on the model's cosines: least squares for a
    regression head, multinomial logistic regression (L-BFGS, convex) for classes. Returns the fit."""
    import torch

    x, y = _cosines(model, dataset, collate)
    features = torch.stack([x, torch.ones_like(x)], 1)
    head = model.classifier
    if model.config.problem_type == "regression":
        coef = torch.linalg.lstsq(features, y.double().unsqueeze(1)).solution.T  # (1, 2)
    else:
        coef = torch.zeros(head.out_features, 2, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([coef], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(features @ coef.T, y.long())
            loss.backward()
            return loss

        opt.step(closure)
        coef = coef.detach()
    with torch.no_grad():
        head.weight.zero_()
        head.weight[:, :2] = (coef / SCALE).to(head.weight.dtype)
        head.bias.zero_()
    return {"slope": coef[:, 0].tolist(), "intercept": coef[:, 1].tolist(), "samples": len(x)}

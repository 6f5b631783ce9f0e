#!/usr/bin/python3
"""Trains SpectrumKV's stand-in model: a small byte-level Llama with head_dim 64.

The shared stories260K model has head_dim 8, too small to carry quality claims about KV
compression (DESIGN.md section 6). This recipe trains, on CPU, a Llama-architecture model with
production-sized heads on the first 90% of each of the five Jane Austen novels (the last 10% of
each is held out for evaluation), mixed with synthetic passkey sequences so that the model learns
to retrieve, and exports it in llama2.c's version-1 layout (magic "ak42") with a llama2.c
tokenizer.bin, both loadable by /work/main/engine.

Reproducible: fixed seed and deterministic data order; with --steps N the curriculum and the
learning rate follow the step count (CPU BLAS reductions may still differ in the last bits between
machines). The default, --minutes, follows elapsed wall time instead, because the training machine
is shared; the log then records the step at which each phase began. Everything it decides is
logged. The curriculum (--schedule) starts at 128 tokens with a high passkey share and a high
weight on the retrieved digits, where the retrieval circuit forms cheaply, and ends at the full
1024-token context.

Tokens are bytes: id = byte + 3, with 0 <unk>, 1 <s> (BOS), 2 </s>, as in llama2.c's byte
fallback, so the engine's tokenizer (dummy-prefix space, byte fallback) produces exactly the ids
the model was trained on.

Task templates (skv-eval builds the same ones; keep them in sync):
  passkey: <s> " " filler_a " The pass key is 12345. Remember it. 12345 is the pass key. " filler_b
           " What is the pass key? The pass key is 12345."
  copy:    <s> " " filler_a " " span " " filler_b " " span       (span: 24-96 bytes of text; the
           repeat after its first COPY_CUE bytes is scored: only a model that copies predicts it)
  recall:  <s> " " filler_a " Codes: K123=48213; K456=90211; ... K789=11111." filler_b
           " Code K456=90211."                                   (4-12 pairs; the value is scored)
Stand-in v2 (--tasks passkey:1,copy:1,recall:1 --init <v1 checkpoint>) mixes all three; v1 was
trained on text and passkey rows only.
"""

import argparse
import json
import math
import os
import random
import re
import struct
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

BOS = 1
EOS = 2
BYTE_OFFSET = 3
VOCAB_SIZE = 256 + BYTE_OFFSET
HELD_OUT_FRACTION = 0.1
NOVELS = ["emma", "mansfieldpark", "northangerabbey", "prideprejudice", "sensesensibility"]

KEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is "
KEY_DIGITS = 5
COPY_CUE = 8             # repeated bytes a model needs to see before it can know a copy started
COPY_SPAN = (24, 96)     # span length range
RECALL_PAIRS = (4, 12)   # code pairs per recall row
RECALL_DIGITS = 5


# ---- model (llama2.c model.py, trimmed to what the export needs) -------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(head_dim, seq_len, theta=10000.0):
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(seq_len).float(), freqs)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x, cos, sin):
    # x: [batch, seq, heads, head_dim]; pairs (2i, 2i+1) rotate by pos * theta^(-2i/head_dim),
    # the llama2.c convention the engine implements.
    xr = x.float().reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xr[..., 0], xr[..., 1]
    c = cos[None, : x.shape[1], None, :]
    s = sin[None, : x.shape[1], None, :]
    out = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1)
    return out.flatten(-2).type_as(x)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dim, hd = cfg["dim"], cfg["dim"] // cfg["n_heads"]
        self.n_heads, self.n_kv_heads, self.head_dim = cfg["n_heads"], cfg["n_kv_heads"], hd
        self.attention_norm = RMSNorm(dim)
        self.ffn_norm = RMSNorm(dim)
        self.wq = nn.Linear(dim, cfg["n_heads"] * hd, bias=False)
        self.wk = nn.Linear(dim, cfg["n_kv_heads"] * hd, bias=False)
        self.wv = nn.Linear(dim, cfg["n_kv_heads"] * hd, bias=False)
        self.wo = nn.Linear(cfg["n_heads"] * hd, dim, bias=False)
        self.w1 = nn.Linear(dim, cfg["hidden_dim"], bias=False)
        self.w2 = nn.Linear(cfg["hidden_dim"], dim, bias=False)
        self.w3 = nn.Linear(dim, cfg["hidden_dim"], bias=False)

    def forward(self, x, cos, sin, mask):
        b, t, _ = x.shape
        h = self.attention_norm(x)
        q = apply_rope(self.wq(h).view(b, t, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.wk(h).view(b, t, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(h).view(b, t, self.n_kv_heads, self.head_dim)
        rep = self.n_heads // self.n_kv_heads
        k = k.repeat_interleave(rep, dim=2)  # query head j uses kv head j // rep, as the engine
        v = v.repeat_interleave(rep, dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim) + mask[:t, :t]
        att = F.softmax(scores.float(), dim=-1).type_as(q) @ v
        x = x + self.wo(att.transpose(1, 2).reshape(b, t, -1))
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg["vocab_size"], cfg["dim"])
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg["n_layers"])])
        self.norm = RMSNorm(cfg["dim"])
        self.output = nn.Linear(cfg["dim"], cfg["vocab_size"], bias=False)
        self.output.weight = self.tok_embeddings.weight  # shared classifier
        cos, sin = rope_tables(cfg["dim"] // cfg["n_heads"], cfg["seq_len"])
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        mask = torch.full((cfg["seq_len"], cfg["seq_len"]), float("-inf")).triu(1)
        self.register_buffer("mask", mask, persistent=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2 style scaled residual projections
            if name.endswith("wo.weight") or name.endswith("w2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg["n_layers"]))

    @staticmethod
    def _init(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, tokens):
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, self.cos, self.sin, self.mask)
        return self.output(self.norm(x))


# ---- export (llama2.c export.py, version 1) -----------------------------------------------------


def export_version1(model, path):
    cfg = model.cfg
    with open(path, "wb") as f:
        f.write(struct.pack("I", 0x616B3432))
        f.write(struct.pack("i", 1))
        f.write(struct.pack("iiiiiii", cfg["dim"], cfg["hidden_dim"], cfg["n_layers"],
                            cfg["n_heads"], cfg["n_kv_heads"], cfg["vocab_size"],
                            cfg["seq_len"]))
        f.write(struct.pack("B", 1))  # shared classifier
        f.write(b"\0" * (256 - f.tell()))
        layers = model.layers
        weights = [
            *[l.attention_norm.weight for l in layers],
            *[l.ffn_norm.weight for l in layers],
            model.norm.weight,
            model.tok_embeddings.weight,
            *[l.wq.weight for l in layers],
            *[l.wk.weight for l in layers],
            *[l.wv.weight for l in layers],
            *[l.wo.weight for l in layers],
            *[l.w1.weight for l in layers],
            *[l.w2.weight for l in layers],
            *[l.w3.weight for l in layers],
        ]
        for w in weights:
            f.write(w.detach().float().contiguous().numpy().tobytes())


def export_tokenizer(path):
    """llama2.c tokenizer.bin for the byte vocabulary: printable ASCII as itself, other bytes as
    <0xXX>, so the engine's lookup and its byte fallback both give id = byte + 3."""
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"]
    for byte in range(256):
        if 0x20 <= byte <= 0x7E:
            pieces.append(bytes([byte]))
        else:
            pieces.append(("<0x%02X>" % byte).encode())
    with open(path, "wb") as f:
        f.write(struct.pack("i", max(len(p) for p in pieces)))
        for p in pieces:
            f.write(struct.pack("fi", 0.0, len(p)))
            f.write(p)


# ---- data ---------------------------------------------------------------------------------------


def load_novels(text_dir):
    train, held_out = [], []
    for name in NOVELS:
        with open(os.path.join(text_dir, name + ".txt"), "rb") as f:
            data = f.read()
        split = int(len(data) * (1.0 - HELD_OUT_FRACTION))  # skv-eval's --text_tail uses this
        train.append(data[:split])
        held_out.append(data[split:])
    return b"\n\n".join(train), b"\n\n".join(held_out)


def to_ids(data):
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long() + BYTE_OFFSET


def text_row(corpus, length, rng):
    """BOS + `length` bytes of text from a random offset."""
    start = rng.randrange(0, len(corpus) - length)
    return [BOS] + list(corpus[start:start + length]), []


def passkey_row(corpus, length, rng, depth=None, key=None):
    """BOS + " " + prompt with a key at `depth`; returns ids (length + 1) and the positions of
    the key digits that a model can only predict by retrieval (the repeat and the answer)."""
    key = key if key is not None else str(rng.randrange(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS))
    sentence = KEY_SENTENCE.format(key=key).encode()
    question = (QUESTION + key + ".").encode()
    filler_len = length - 4 - len(sentence) - len(question)
    assert filler_len > 0, length
    depth = rng.random() if depth is None else depth
    start = rng.randrange(0, len(corpus) - filler_len)
    filler = corpus[start:start + filler_len]
    cut = int(round(depth * filler_len))
    text = b" " + filler[:cut] + b" " + sentence + b" " + filler[cut:] + b" " + question
    assert len(text) == length, (len(text), length)
    ids = [BOS] + list(text)
    # Positions (in ids) of the repeated key inside the sentence and of the final answer.
    first = 1 + 1 + cut + 1 + len("The pass key is ")
    repeat = first + KEY_DIGITS + len(". Remember it. ")
    answer = len(ids) - 1 - KEY_DIGITS
    positions = list(range(repeat, repeat + KEY_DIGITS)) + list(range(answer, answer + KEY_DIGITS))
    return ids, positions


def _embed(corpus, length, rng, block, tail, depth=None):
    """" " filler_a " " block " " filler_b " " tail, `length` bytes in all, with `block` at
    `depth` of the filler; returns the text and the offsets of block and tail in it."""
    filler_len = length - 3 - len(block) - len(tail)
    assert filler_len > 0, length
    depth = rng.random() if depth is None else depth
    start = rng.randrange(0, len(corpus) - filler_len)
    filler = corpus[start:start + filler_len]
    cut = int(round(depth * filler_len))
    text = b" " + filler[:cut] + b" " + block + b" " + filler[cut:] + tail
    assert len(text) == length, (len(text), length)
    return text, 1 + cut + 1, length - len(tail)


def copy_row(corpus, length, rng, depth=None, span_len=None):
    """BOS + a span of text, filler, and the span again: the repeat's bytes after its first
    COPY_CUE are the scored positions (ids indices)."""
    span_len = span_len or rng.randint(COPY_SPAN[0], min(COPY_SPAN[1], (length - 16) // 3))
    start = rng.randrange(0, len(corpus) - span_len)
    span = corpus[start:start + span_len]
    text, _, tail_at = _embed(corpus, length, rng, span, b" " + span, depth)
    first = 1 + tail_at + 1 + COPY_CUE  # ids index: BOS, then " ", then the repeat
    return [BOS] + list(text), list(range(first, 1 + length))


def recall_row(corpus, length, rng, depth=None, pairs=None):
    """BOS + filler holding "Codes: K123=48213; ..." and a question for one code at the end;
    the answer's digits are the scored positions."""
    pairs = pairs or rng.randint(RECALL_PAIRS[0], max(RECALL_PAIRS[0], min(RECALL_PAIRS[1], (length // 2 - 8) // 13)))
    keys = rng.sample(range(100, 1000), pairs)
    values = [str(rng.randrange(10 ** (RECALL_DIGITS - 1), 10 ** RECALL_DIGITS)) for _ in keys]
    block = ("Codes: " + "; ".join("K%d=%s" % kv for kv in zip(keys, values)) + ".").encode()
    asked = rng.randrange(pairs)
    tail = (" Code K%d=%s." % (keys[asked], values[asked])).encode()
    text, _, tail_at = _embed(corpus, length, rng, block, tail, depth)
    answer = 1 + tail_at + len(" Code K%d=" % keys[asked])
    return [BOS] + list(text), list(range(answer, answer + RECALL_DIGITS))


def recall_dense_row(corpus, length, rng, depth=None):
    """BOS + "Codes: K123=48213; ..." then questions for random codes until the row is full, every
    answer digit scored: recall's signal as dense as repeat rows make copying's (one question per
    row of filler did not teach it). Training only."""
    # As in recall_row: the codes take at most about half the row, so that questions follow.
    pairs = rng.randint(RECALL_PAIRS[0], max(RECALL_PAIRS[0], min(RECALL_PAIRS[1], (length // 2 - 8) // 13)))
    keys = rng.sample(range(100, 1000), pairs)
    values = [str(rng.randrange(10 ** (RECALL_DIGITS - 1), 10 ** RECALL_DIGITS)) for _ in keys]
    text = bytearray(("Codes: " + "; ".join("K%d=%s" % kv for kv in zip(keys, values)) + ".").encode())
    scored = []
    while True:
        asked = rng.randrange(pairs)
        question = (" Code K%d=" % keys[asked]).encode()
        if len(text) + len(question) + RECALL_DIGITS + 1 > length:
            break
        text += question
        scored += range(1 + len(text), 1 + len(text) + RECALL_DIGITS)
        text += (values[asked] + ".").encode()
    text += b" " * (length - len(text))
    return [BOS] + list(text[:length]), scored


def copy_random_row(corpus, length, rng, depth=None):
    """A copy row whose span is random lowercase words: only copying predicts it, which is what
    makes the copying (induction) circuit form; text spans alone are partly predictable from
    language. Training only; skv-eval scores copy_row."""
    span_len = rng.randint(COPY_SPAN[0], min(COPY_SPAN[1], (length - 16) // 3))
    span = bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz     ") for _ in range(span_len))
    text, _, tail_at = _embed(corpus, length, rng, span, b" " + span, depth)
    first = 1 + tail_at + 1 + COPY_CUE
    return [BOS] + list(text), list(range(first, 1 + length))


def repeat_row(corpus, length, rng, depth=None):
    """BOS + a span of random lowercase letters repeated until the row is full; every byte after
    the first span is scored. Dense copying signal: where the copying (induction) circuit forms
    in a few hundred steps (copies embedded in text alone did not form it in 800). Training only."""
    span_len = rng.randint(8, 40)
    span = [rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(span_len)]
    text = (span * (length // span_len + 1))[:length]
    return [BOS] + text, list(range(1 + span_len, 1 + length))


TASK_ROWS = {"passkey": passkey_row, "copy": copy_row, "copy_random": copy_random_row,
             "recall": recall_row, "recall_dense": recall_dense_row, "repeat": repeat_row}


def make_batch(corpus, batch, seq, task_share, rng, tasks=(("passkey", 1.0),)):
    """`task_share` of the rows are task rows, drawn from `tasks` ((name, weight), ...)."""
    names, weights_ = zip(*tasks)
    rows, weights = [], []
    for _ in range(batch):
        if rng.random() < task_share:
            raw, positions = TASK_ROWS[rng.choices(names, weights_)[0]](corpus, seq, rng)
        else:
            raw, positions = text_row(corpus, seq, rng)
        ids = [BOS] + [b + BYTE_OFFSET for b in raw[1:]]
        rows.append(ids)
        w = torch.zeros(seq)
        for p in positions:
            w[p - 1] = 1.0  # target index of position p
        weights.append(w)
    t = torch.tensor(rows, dtype=torch.long)
    return t[:, :-1], t[:, 1:], torch.stack(weights)


def phase_for(progress, schedule):
    """Returns (seq, batch, passkey_share, answer_weight) of the phase containing `progress`."""
    for phase in schedule:
        if progress < phase[0]:
            return phase[1:]
    return schedule[-1][1:]


# ---- evaluation ---------------------------------------------------------------------------------


@torch.no_grad()
def held_out_loss(model, held_out, seq, windows):
    ids = to_ids(held_out)
    total, count = 0.0, 0
    stride = (len(ids) - seq - 1) // max(1, windows)
    for w in range(windows):
        chunk = ids[w * stride:w * stride + seq]
        x = torch.cat([torch.tensor([BOS]), chunk[:-1]])[None]
        logits = model(x)
        total += F.cross_entropy(logits[0], chunk, reduction="sum").item()
        count += seq
    return total / count


@torch.no_grad()
def passkey_accuracy(model, held_out, seq, trials, seed):
    """Exact-match retrieval with teacher forcing on the answer digits: all five argmaxes right
    given the right prefix is exactly what greedy decoding would produce."""
    rng = random.Random(seed)
    hits, by_depth = 0, {}
    for i in range(trials):
        depth = (i % 5) / 4.0 * 0.9 + 0.05
        raw, positions = passkey_row(held_out, seq, rng, depth=depth)
        ids = torch.tensor([[BOS] + [b + BYTE_OFFSET for b in raw[1:]]])
        logits = model(ids[:, :-1])[0]
        answer = positions[KEY_DIGITS:]
        ok = all(int(logits[p - 1].argmax()) == int(ids[0, p]) for p in answer)
        hits += ok
        d = by_depth.setdefault(round(depth, 2), [0, 0])
        d[0] += ok
        d[1] += 1
    return hits / trials, by_depth


@torch.no_grad()
def task_accuracy(model, held_out, seq, trials, seed, row):
    """(rows with every scored position right, share of scored positions right) of `row` rows,
    teacher-forced (copy: the whole repeat after its cue; recall: the value's digits), over
    depths 0.05..0.95."""
    rng = random.Random(seed)
    hits, right, scored = 0, 0, 0
    for i in range(trials):
        raw, positions = row(held_out, seq, rng, depth=(i % 5) / 4.0 * 0.9 + 0.05)
        ids = torch.tensor([[BOS] + [b + BYTE_OFFSET for b in raw[1:]]])
        logits = model(ids[:, :-1])[0]
        correct = [int(logits[p - 1].argmax()) == int(ids[0, p]) for p in positions]
        hits += all(correct)
        right += sum(correct)
        scored += len(correct)
    return hits / trials, right / max(1, scored)


def load_version1(model, path):
    """Loads a checkpoint written by export_version1 into `model` (same shape): the warm start."""
    with open(path, "rb") as f:
        data = f.read()
    magic, version = struct.unpack("Ii", data[:8])
    header = struct.unpack("iiiiiii", data[8:36])
    cfg = model.cfg
    expected = (cfg["dim"], cfg["hidden_dim"], cfg["n_layers"], cfg["n_heads"], cfg["n_kv_heads"],
                cfg["vocab_size"], cfg["seq_len"])
    if magic != 0x616B3432 or version != 1 or header != expected:
        raise ValueError("%s: not a version-1 checkpoint of shape %s (header %s)" % (path, expected, header))
    layers = model.layers
    weights = [*[l.attention_norm.weight for l in layers], *[l.ffn_norm.weight for l in layers],
               model.norm.weight, model.tok_embeddings.weight, *[l.wq.weight for l in layers],
               *[l.wk.weight for l in layers], *[l.wv.weight for l in layers], *[l.wo.weight for l in layers],
               *[l.w1.weight for l in layers], *[l.w2.weight for l in layers], *[l.w3.weight for l in layers]]
    offset = 256
    with torch.no_grad():
        for w in weights:
            n = w.numel() * 4
            w.copy_(torch.frombuffer(bytearray(data[offset:offset + n]), dtype=torch.float32).view_as(w))
            offset += n
    if offset != len(data):
        raise ValueError("%s: %d bytes left after the weights" % (path, len(data) - offset))


# ---- main ---------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--text_dir", default=os.path.join(
        os.environ.get("SKV_DATA_DIR", os.path.join(os.path.dirname(__file__), "../../../shared/data")),
        "text/janeausten"))
    ap.add_argument("--out_dir", default=os.path.join(os.path.dirname(__file__), "../../models"))
    ap.add_argument("--name", default="austen-byte-6l-h64")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--hidden_dim", type=int, default=384)
    ap.add_argument("--n_layers", type=int, default=6)
    ap.add_argument("--n_heads", type=int, default=2)
    ap.add_argument("--n_kv_heads", type=int, default=1)
    ap.add_argument("--seq_len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=0,
                    help="fixed step count (reproducible); 0 = run for --minutes of wall time")
    # Curriculum: end of phase (fraction of training):sequence length:batch[:passkey share
    # [:answer weight]]. Short key distances first, where steps are cheap and the retrieval
    # (induction) circuit forms; the last phase trains RoPE positions up to the full context.
    ap.add_argument("--schedule",
                    default="0.4:128:16:0.6:5,0.6:256:8:0.5:3,0.8:512:4:0.5:2,1.0:1024:2:0.5:2")
    ap.add_argument("--passkey_share", type=float, default=0.5,
                    help="share of passkey rows in phases that do not set their own")
    ap.add_argument("--answer_weight", type=float, default=1.0,
                    help="weight of the mean loss on retrieved key digits, added to the LM loss "
                         "(phases may set their own)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min_lr", type=float, default=2e-4)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--weight_decay", type=float, default=0.1)
    ap.add_argument("--eval_every", type=int, default=100)
    ap.add_argument("--minutes", type=float, default=62.0,
                    help="with --steps 0: training wall time; curriculum and learning rate follow "
                         "the elapsed fraction of it, and the log records where each phase began")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 is fastest on a busy 2-core machine")
    ap.add_argument("--tasks", default="passkey:1",
                    help="task rows and their weights, e.g. passkey:1,copy:1,recall:1 (the schedule's share "
                         "column is the share of task rows)")
    ap.add_argument("--init", default="",
                    help="warm start from a version-1 checkpoint of the same shape (v2 starts from v1)")
    ap.add_argument("--train_only", default="",
                    help="regular expression: train only the parameters whose names match (e.g. "
                         "'attention' for the attention blocks); empty = all")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--bench", type=int, default=0, help="time N steps per phase and exit")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    train, held_out = load_novels(args.text_dir)
    cfg = dict(dim=args.dim, hidden_dim=args.hidden_dim, n_layers=args.n_layers,
               n_heads=args.n_heads, n_kv_heads=args.n_kv_heads, vocab_size=VOCAB_SIZE,
               seq_len=args.seq_len)
    model = Transformer(cfg)
    if args.init:
        load_version1(model, args.init)
    tasks = tuple((name, float(weight)) for name, weight in (t.split(":") for t in args.tasks.split(",")))
    unknown = [name for name, _ in tasks if name not in TASK_ROWS]
    if unknown:
        ap.error("--tasks: unknown task(s) %s; known: %s" % (unknown, ", ".join(TASK_ROWS)))
    params = sum(p.numel() for p in model.parameters())
    schedule = []  # (end of phase as a fraction of training, sequence length, batch)
    for part in args.schedule.split(","):
        f = part.split(":")
        share = float(f[3]) if len(f) > 3 else args.passkey_share
        weight = float(f[4]) if len(f) > 4 else args.answer_weight
        schedule.append((float(f[0]), int(f[1]), int(f[2]), share, weight))
    log = lambda **kv: print(json.dumps(kv), flush=True)
    log(event="start", config=cfg, params=params, args=vars(args), train_bytes=len(train),
        held_out_bytes=len(held_out), schedule=schedule, torch=torch.__version__)

    if args.train_only:  # the rest stays as --init left it (e.g. keep the language while copying forms)
        pattern = re.compile(args.train_only)
        for n, p in model.named_parameters():
            p.requires_grad_(bool(pattern.search(n)))
        trained = [n for n, p in model.named_parameters() if p.requires_grad]
        if not trained:
            sys.exit("train.py: --train_only %r matches no parameter" % args.train_only)
        log(event="train_only", pattern=args.train_only, parameters=trained)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and p.requires_grad]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 and p.requires_grad]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))

    if args.bench:
        for _, seq, batch, share, _ in schedule:
            t0 = time.time()
            for _ in range(args.bench):
                x, y, w = make_batch(train, batch, seq, share, rng, tasks)
                loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
                opt.zero_grad()
                loss.backward()
                opt.step()
            dt = (time.time() - t0) / args.bench
            log(event="bench", seq=seq, batch=batch, s_per_step=dt, tok_per_s=batch * seq / dt)
        return

    os.makedirs(args.out_dir, exist_ok=True)
    export_tokenizer(os.path.join(args.out_dir, "byte259.tok.bin"))
    start = time.time()
    budget_s = args.minutes * 60.0
    step, last_seq = 0, None
    while True:
        elapsed = time.time() - start
        # Progress drives the curriculum and the learning rate: by steps when they are fixed,
        # else by wall time (the machine is shared, so throughput is not known in advance).
        progress = step / args.steps if args.steps else elapsed / budget_s
        if progress >= 1.0:
            break
        if step < args.warmup:
            lr = args.lr * (step + 1) / args.warmup
        else:
            lr = args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))
        for g in opt.param_groups:
            g["lr"] = lr
        seq, batch, share, answer_weight = phase_for(progress, schedule)
        if (seq, batch, share, answer_weight) != last_seq:
            log(event="phase", step=step, seq=seq, batch=batch, task_share=share,
                answer_weight=answer_weight, progress=round(progress, 4))
            last_seq = (seq, batch, share, answer_weight)
        x, y, w = make_batch(train, batch, seq, share, rng, tasks)
        logits = model(x)
        per_token = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
        lm_loss = per_token.mean()
        answer_loss = (per_token * w.flatten()).sum() / w.sum().clamp(min=1)
        loss = lm_loss + answer_weight * answer_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 10 == 0:
            log(event="step", step=step, seq=seq, lr=round(lr, 6), lm_loss=round(lm_loss.item(), 4),
                answer_loss=round(answer_loss.item(), 4), grad_norm=round(float(grad_norm), 3),
                progress=round(progress, 4), elapsed_s=round(time.time() - start, 1))
        step += 1
        if step % args.eval_every == 0:
            model.eval()
            acc, by_depth = passkey_accuracy(model, held_out, seq, 20, args.seed + 1)
            hl = held_out_loss(model, held_out, seq, 4)
            copy_acc, copy_tokens = task_accuracy(model, held_out, seq, 10, args.seed + 3, copy_row)
            recall_acc, recall_tokens = task_accuracy(model, held_out, seq, 10, args.seed + 4, recall_row)
            model.train()
            log(event="eval", step=step, seq=seq, passkey_acc=acc, passkey_by_depth=by_depth,
                copy_acc=copy_acc, copy_token_acc=round(copy_tokens, 4), recall_acc=recall_acc,
                recall_token_acc=round(recall_tokens, 4), held_out_loss=round(hl, 4),
                elapsed_s=round(time.time() - start, 1))
            export_version1(model, os.path.join(args.out_dir, args.name + ".bin"))

    model.eval()
    hl = held_out_loss(model, held_out, args.seq_len, 16)
    acc_1024, by_depth = passkey_accuracy(model, held_out, args.seq_len, 50, args.seed + 2)
    copy_1024, copy_tokens_1024 = task_accuracy(model, held_out, args.seq_len, 50, args.seed + 5, copy_row)
    recall_1024, recall_tokens_1024 = task_accuracy(model, held_out, args.seq_len, 50, args.seed + 6, recall_row)
    export_version1(model, os.path.join(args.out_dir, args.name + ".bin"))
    export_tokenizer(os.path.join(args.out_dir, "byte259.tok.bin"))
    log(event="final", steps=step, held_out_loss=round(hl, 4),
        held_out_ppl_per_byte=round(math.exp(hl), 4), passkey_acc_1024=acc_1024,
        passkey_by_depth=by_depth, copy_acc_1024=copy_1024, copy_token_acc_1024=round(copy_tokens_1024, 4),
        recall_acc_1024=recall_1024, recall_token_acc_1024=round(recall_tokens_1024, 4),
        elapsed_s=round(time.time() - start, 1))


if __name__ == "__main__":
    sys.exit(main())

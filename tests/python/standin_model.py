"""A PyTorch forward of llama2.c checkpoints with the reference engine's numerics (engine/src), for
driving a real model through the engine connectors.

    model = standin_model.Model.load("models/austen-byte-6l-h64.bin")
    tok = standin_model.Tokenizer.load("models/byte259.tok.bin", model.vocab_size)
    prompt = tok.encode(text)                     # BOS first, as skv-pd-generate encodes
    kv = model.prefill(prompt[:-1])               # [layers, 2, tokens, kv_heads, head_dim] FP16
    out = model.generate(kv, prompt[-1], count)   # greedy, from a (transferred) FP16 KV

Checkpoints: the legacy layout (7-int header, negative vocab_size = unshared classifier, RoPE
tables after the final norm) and version 1 ("ak42", 256-byte header, norms first). What matches
the engine (engine/src/session.cc, model.cc):
  - fp32 throughout; RMSNorm as weight * (x / sqrt(mean(x^2) + 1e-5)); SwiGLU; GQA (query head h
    reads KV head h / (heads / kv_heads)); RoPE on pairs (2i, 2i+1) with llama2.c's fp32 tables
    (freq = 1 / powf(10000, 2i / head_dim), angle = pos * freq, cosf / sinf: the C library's
    own functions through ctypes, so the tables are the engine's bit for bit);
  - attention scores q.k * (1 / sqrt(head_dim)), causal softmax, over an fp32 cache: the prefill
    attends with its own fp32 K/V (the engine keeps fp32 and rounds only on export), the decode
    side with the FP16 KV it imported widened to fp32 plus its own new rows in fp32;
  - the exported KV is post-RoPE K and V rounded to FP16 (round to nearest even);
  - greedy decoding stops at BOS (token 1) or at seq_len.
Reduction orders differ (torch's kernels vs OpenBLAS and the engine's fast exp), so results agree
to fp32 rounding, not bit for bit."""

import ctypes
import ctypes.util
import math
import struct

import torch

BOS, EOS = 1, 2
_V1_MAGIC = 0x616B3432
_RMS_EPS = 1e-5


def _libm():
    try:
        libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    except OSError:
        return None
    for name, args in (("powf", [ctypes.c_float, ctypes.c_float]), ("cosf", [ctypes.c_float]),
                       ("sinf", [ctypes.c_float])):
        getattr(libm, name).restype = ctypes.c_float
        getattr(libm, name).argtypes = args
    return libm


def _rope_tables(seq_len, head_dim):
    """The engine's RoPE tables (model.cc BuildRopeTables, llama2.c run.c): freq = 1.0f /
    powf(10000, 2i / head_dim), angle = (float)pos * freq, then cosf / sinf, all in fp32. Through
    the C library's own powf, cosf and sinf when it loads (bit for bit what the engine computes);
    else in double, rounded once (a few entries then differ in the last bit)."""
    pairs = head_dim // 2
    exponent = torch.arange(pairs, dtype=torch.float32) * 2 / float(head_dim)
    libm = _libm()
    if libm is not None:
        freq = 1.0 / torch.tensor([libm.powf(10000.0, e) for e in exponent.tolist()], dtype=torch.float32)
    else:
        freq = 1.0 / torch.pow(torch.tensor(10000.0, dtype=torch.float64), exponent.double()).float()
    angle = torch.arange(seq_len, dtype=torch.float32)[:, None] * freq[None, :]
    if libm is not None:
        flat = angle.flatten().tolist()
        cos = torch.tensor([libm.cosf(a) for a in flat], dtype=torch.float32).view(angle.shape)
        sin = torch.tensor([libm.sinf(a) for a in flat], dtype=torch.float32).view(angle.shape)
        return cos, sin
    return torch.cos(angle.double()).float(), torch.sin(angle.double()).float()


class Model:

    def __init__(self, config, weights):
        self.dim, self.hidden_dim, self.n_layers, self.n_heads, self.n_kv_heads, self.vocab_size, \
            self.seq_len = config
        self.head_dim = self.dim // self.n_heads
        self.w = weights
        self.rope_cos, self.rope_sin = _rope_tables(self.seq_len, self.head_dim)   # [seq_len, pairs]

    @classmethod
    def load(cls, path):
        with open(path, "rb") as f:
            data = f.read()
        if len(data) >= 4 and struct.unpack_from("<I", data, 0)[0] == _V1_MAGIC:
            version = struct.unpack_from("<i", data, 4)[0]
            if version != 1:
                raise ValueError("%s: llama2.c format version %d is not supported (only legacy and 1)"
                                 % (path, version))
            config = struct.unpack_from("<7i", data, 8)
            shared = data[36] == 1
            header, legacy = 256, False
        else:
            config = struct.unpack_from("<7i", data, 0)
            shared = config[5] > 0
            config = config[:5] + (abs(config[5]),) + config[6:]
            header, legacy = 28, True
        dim, hidden, layers, heads, kv_heads, vocab, seq_len = config
        head_dim = dim // heads
        kv_dim = kv_heads * head_dim
        per_layer_floats = 2 * dim + 2 * dim * dim + 2 * kv_dim * dim + 3 * hidden * dim
        expected = vocab * dim * (1 if shared else 2) + layers * per_layer_floats + dim + \
            (seq_len * head_dim if legacy else 0)
        if len(data) != header + 4 * expected:
            raise ValueError("%s: %d bytes, the header (dim=%d hidden=%d layers=%d heads=%d kv_heads=%d vocab=%d "
                             "seq_len=%d) implies %d" % (path, len(data), dim, hidden, layers, heads, kv_heads, vocab,
                                                         seq_len, header + 4 * expected))
        floats = torch.frombuffer(bytearray(data[header:]), dtype=torch.float32)
        at = [0]

        def take(*shape):
            n = math.prod(shape)
            t = floats[at[0]:at[0] + n].view(*shape)
            at[0] += n
            return t

        def per_layer(*shape):
            return take(layers, *shape)

        w = {}
        if legacy:
            w["emb"] = take(vocab, dim)
            w["rms_att"] = per_layer(dim)
            w["wq"], w["wk"], w["wv"] = per_layer(dim, dim), per_layer(kv_dim, dim), per_layer(kv_dim, dim)
            w["wo"], w["rms_ffn"] = per_layer(dim, dim), per_layer(dim)
            w["w1"], w["w2"], w["w3"] = per_layer(hidden, dim), per_layer(dim, hidden), per_layer(hidden, dim)
            w["rms_final"] = take(dim)
            take(2 * seq_len * (head_dim // 2))   # RoPE tables: recomputed, as the engine does
        else:
            w["rms_att"], w["rms_ffn"], w["rms_final"] = per_layer(dim), per_layer(dim), take(dim)
            w["emb"] = take(vocab, dim)
            w["wq"], w["wk"], w["wv"] = per_layer(dim, dim), per_layer(kv_dim, dim), per_layer(kv_dim, dim)
            w["wo"] = per_layer(dim, dim)
            w["w1"], w["w2"], w["w3"] = per_layer(hidden, dim), per_layer(dim, hidden), per_layer(hidden, dim)
        w["cls"] = w["emb"] if shared else take(vocab, dim)
        return cls((dim, hidden, layers, heads, kv_heads, vocab, seq_len), w)

    # ---- the forward pass ------------------------------------------------------------------------

    @staticmethod
    def _rmsnorm(x, weight):
        scale = 1.0 / torch.sqrt((x * x).sum(-1, keepdim=True) / x.shape[-1] + _RMS_EPS)
        return weight * (scale * x)

    def _rope(self, x, first_pos):
        """x: [rows, heads, head_dim], rows at positions first_pos, first_pos + 1, ..."""
        rows = x.shape[0]
        cos = self.rope_cos[first_pos:first_pos + rows, None, :]
        sin = self.rope_sin[first_pos:first_pos + rows, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    def forward(self, tokens, cache):
        """Runs `tokens` after the cache's rows; appends their fp32 K/V to `cache` (a list of
        [keys, values] per layer, [positions, kv_heads, head_dim] fp32) and returns the logits of
        the last token."""
        n = len(tokens)
        first = cache[0][0].shape[0]
        if first + n > self.seq_len:
            raise ValueError("%d + %d tokens pass seq_len %d" % (first, n, self.seq_len))
        heads, kv_heads, hd = self.n_heads, self.n_kv_heads, self.head_dim
        group = heads // kv_heads
        scale = 1.0 / math.sqrt(hd)
        w = self.w
        x = w["emb"][torch.tensor(tokens, dtype=torch.long)].clone()   # [n, dim]
        causal = torch.ones(n, first + n, dtype=torch.bool).tril(first)
        for layer in range(self.n_layers):
            xb = self._rmsnorm(x, w["rms_att"][layer])
            q = self._rope((xb @ w["wq"][layer].t()).view(n, heads, hd), first)
            k = self._rope((xb @ w["wk"][layer].t()).view(n, kv_heads, hd), first)
            v = (xb @ w["wv"][layer].t()).view(n, kv_heads, hd)
            cache[layer][0] = keys = torch.cat([cache[layer][0], k])
            cache[layer][1] = values = torch.cat([cache[layer][1], v])
            kh = keys.permute(1, 0, 2).repeat_interleave(group, 0)      # [heads, context, hd]
            vh = values.permute(1, 0, 2).repeat_interleave(group, 0)
            scores = torch.bmm(q.permute(1, 0, 2), kh.transpose(1, 2)) * scale   # [heads, n, context]
            scores = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            attended = torch.bmm(scores, vh).permute(1, 0, 2).reshape(n, self.dim)
            x = x + attended @ w["wo"][layer].t()
            xb = self._rmsnorm(x, w["rms_ffn"][layer])
            gate, up = xb @ w["w1"][layer].t(), xb @ w["w3"][layer].t()
            x = x + (gate * (1.0 / (1.0 + torch.exp(-gate))) * up) @ w["w2"][layer].t()
        return self._rmsnorm(x[-1:], w["rms_final"]) @ w["cls"].t()

    def empty_cache(self):
        empty = torch.zeros(0, self.n_kv_heads, self.head_dim)
        return [[empty, empty] for _ in range(self.n_layers)]

    # ---- the prefill and decode sides -----------------------------------------------------------

    @torch.no_grad()
    def prefill(self, tokens, dtype=torch.float16):
        """The prefill side: [layers, 2, tokens, kv_heads, head_dim] post-RoPE KV in `dtype`, as the
        engine's ExportKv / ExportLayerKv write it."""
        cache = self.empty_cache()
        self.forward(tokens, cache)
        return torch.stack([torch.stack([k, v]) for k, v in cache]).to(dtype)

    @torch.no_grad()
    def generate(self, kv, last_token, count):
        """The decode side: imports `kv` ([layers, 2, tokens, kv_heads, head_dim], any float dtype,
        widened to fp32), feeds `last_token` (the prompt's last) and decodes greedily: up to
        `count` token ids, fewer at BOS or seq_len (skv-pd-generate's Greedy)."""
        kv = kv.float()
        cache = [[kv[layer, 0].clone(), kv[layer, 1].clone()] for layer in range(self.n_layers)]
        logits = self.forward([last_token], cache)
        out = []
        while len(out) < count:
            token = int(torch.argmax(logits[0]))
            if token == BOS:
                break
            out.append(token)
            if len(out) == count or cache[0][0].shape[0] >= self.seq_len:
                break
            logits = self.forward([token], cache)
        return out


class Tokenizer:
    """llama2.c tokenizer.bin, encoding as the engine's Tokenizer::Encode (run.c's algorithm)."""

    def __init__(self, pieces, scores):
        self.pieces, self.scores = pieces, scores
        self.ids = {}
        for i, piece in enumerate(pieces):
            self.ids.setdefault(piece, i)
        self.byte_tokens, self.byte_of = {}, {}
        for i, piece in enumerate(pieces):
            if len(piece) == 6 and piece.startswith(b"<0x") and piece.endswith(b">"):
                try:
                    byte = int(piece[3:5], 16)
                except ValueError:
                    continue
                self.byte_of[i] = byte
                self.byte_tokens.setdefault(byte, i)

    @classmethod
    def load(cls, path, vocab_size):
        with open(path, "rb") as f:
            data = f.read()
        at, pieces, scores = 4, [], []
        for _ in range(vocab_size):
            score, length = struct.unpack_from("<fi", data, at)
            at += 8
            pieces.append(data[at:at + length])
            scores.append(score)
            at += length
        if at != len(data):
            raise ValueError("%s: %d bytes left after %d tokens" % (path, len(data) - at, vocab_size))
        return cls(pieces, scores)

    def encode(self, text, bos=True, eos=False):
        raw = text.encode("utf-8")
        tokens = []
        if raw and b" " in self.ids:
            tokens.append(self.ids[b" "])   # SentencePiece's dummy space
        start = 0
        while start < len(raw):
            end = start + 1
            while end < len(raw) and end - start < 4 and (raw[end] & 0xC0) == 0x80:
                end += 1
            point = raw[start:end]
            if point in self.ids:
                tokens.append(self.ids[point])
            else:
                for byte in point:
                    if byte not in self.byte_tokens:
                        raise ValueError("byte 0x%02x has no token" % byte)
                    tokens.append(self.byte_tokens[byte])
            start = end
        while True:   # greedy BPE: the best-scoring merge, leftmost on ties
            best, best_score, best_id = -1, -1e10, -1
            for i in range(len(tokens) - 1):
                merged = self.ids.get(self.pieces[tokens[i]] + self.pieces[tokens[i + 1]], -1)
                if merged >= 0 and self.scores[merged] > best_score:
                    best, best_score, best_id = i, self.scores[merged], merged
            if best < 0:
                break
            tokens[best:best + 2] = [best_id]
        return ([BOS] if bos else []) + tokens + ([EOS] if eos else [])

    def decode_piece(self, prev, token):
        piece = self.pieces[token]
        if prev == BOS and piece.startswith(b" "):
            piece = piece[1:]
        if token in self.byte_of:
            return bytes([self.byte_of[token]])
        return piece

    def text(self, prev, tokens):
        """skv-pd-generate's printable text of `tokens` following `prev` (single control bytes
        dropped), as bytes."""
        out = b""
        for token in tokens:
            piece = self.decode_piece(prev, token)
            prev = token
            if len(piece) == 1 and ((piece[0] < 0x20 and piece not in b"\n\t\r ") or piece[0] == 0x7F):
                continue
            out += piece
        return out

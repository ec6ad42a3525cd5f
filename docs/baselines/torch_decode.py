"""The PyTorch baseline of `python -m nanojax.bench decode` (issue 5), written for this comparison: a nanochat-style
(Oct 2025) KV-cache decode loop in eager PyTorch, fp32 on the CPU, with Python per token as nanochat's Engine does
(sampling with top-k 50 at temperature 1, the sampled column back to Python, per-row bookkeeping, a new input tensor).
Same model as `bench decode --depth 4`: model_dim 256, 2 heads of 128, vocab 8192, a 32-token prompt, 256 new tokens.

    pip install torch numpy    # not a nanojax dependency
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python docs/baselines/torch_decode.py [REPEATS]   # best of 3 by default
"""
import time, sys, torch, torch.nn as nn, torch.nn.functional as F
from collections import deque
torch.manual_seed(0)
depth, D, H, V = 4, 256, 2, 8192
hd = D // H
P, N = 32, 256
STOPS = {-1}  # no stop fires: every run decodes N tokens
S = P + N
def norm(x): return F.rms_norm(x, (x.size(-1),))
inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd)); fr = torch.outer(torch.arange(S * 2).float(), inv)
COS, SIN = fr.cos()[None, :, None, :], fr.sin()[None, :, None, :]
def rope(x, cos, sin):
    x1, x2 = x[..., :hd//2], x[..., hd//2:]
    return torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], -1)
class KVCache:
    def __init__(s, B):
        s.k = torch.zeros(depth, B, H, S, hd); s.v = torch.zeros(depth, B, H, S, hd); s.pos = 0
    def insert(s, i, k, v):
        t0, t1 = s.pos, s.pos + k.size(2)
        s.k[i, :, :, t0:t1] = k; s.v[i, :, :, t0:t1] = v
        if i == depth - 1: s.pos = t1
        return s.k[i, :, :, :t1], s.v[i, :, :, :t1]
class Block(nn.Module):
    def __init__(s, i):
        super().__init__(); s.i = i
        s.q = nn.Linear(D, D, bias=False); s.k = nn.Linear(D, D, bias=False); s.v = nn.Linear(D, D, bias=False)
        s.o = nn.Linear(D, D, bias=False); s.fc = nn.Linear(D, 4*D, bias=False); s.proj = nn.Linear(4*D, D, bias=False)
    def forward(s, x, cos, sin, cache):
        B, T, _ = x.shape; h = norm(x)
        q = s.q(h).view(B, T, H, hd); k = s.k(h).view(B, T, H, hd); v = s.v(h).view(B, T, H, hd)
        q, k = norm(rope(q, cos, sin)), norm(rope(k, cos, sin))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        k, v = cache.insert(s.i, k, v)
        Tq, Tk = q.size(2), k.size(2)
        if Tq == 1: y = F.scaled_dot_product_attention(q, k, v, is_causal=False)
        elif Tq == Tk: y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + s.o(y.transpose(1, 2).contiguous().view(B, T, D))
        return x + s.proj(F.relu(s.fc(norm(x))).square())
class GPT(nn.Module):
    def __init__(s):
        super().__init__()
        s.wte = nn.Embedding(V, D); s.blocks = nn.ModuleList(Block(i) for i in range(depth))
        s.head = nn.Linear(D, V, bias=False)
    def forward(s, idx, cache):
        T = idx.size(1); t0 = cache.pos
        cos, sin = COS[:, t0:t0 + T], SIN[:, t0:t0 + T]
        x = norm(s.wte(idx))
        for b in s.blocks: x = b(x, cos, sin, cache)
        logits = s.head(norm(x)).float()
        return 15 * torch.tanh(logits / 15)
m = GPT().eval()
for p in m.parameters(): torch.nn.init.normal_(p, std=0.02)
def sample(logits, rng, temperature=1.0, top_k=50):
    vals, idx = torch.topk(logits, top_k, dim=-1)
    probs = F.softmax(vals / temperature, dim=-1)
    return idx.gather(1, torch.multinomial(probs, 1, generator=rng))
@torch.inference_mode()
def generate(B):
    rng = torch.Generator().manual_seed(42)
    prompt = torch.randint(0, V, (1, P))
    c1 = KVCache(1); logits = m(prompt, c1)[:, -1, :]
    cache = KVCache(B); cache.pos = P
    cache.k[:, :, :, :P] = c1.k[:, :, :, :P]; cache.v[:, :, :, :P] = c1.v[:, :, :, :P]
    ids = sample(logits.expand(B, -1), rng)
    rows = [{"tokens": [], "forced": deque(), "done": False} for _ in range(B)]
    t = time.perf_counter()
    for _ in range(N - 1):
        logits = m(ids, cache)[:, -1, :]
        sampled = sample(logits, rng)[:, 0].tolist()
        column, mask = [], []  # nanochat's per-row bookkeeping: forced tool output, stop tokens, the next input column
        for row, token in zip(rows, sampled):
            forced = len(row["forced"]) > 0
            token = row["forced"].popleft() if forced else token
            mask.append(0 if forced else 1)
            column.append(token)
            row["tokens"].append(token)
            row["done"] = row["done"] or token in STOPS
        ids = torch.tensor(column, dtype=torch.long).unsqueeze(1)
    return (N - 1) * B / (time.perf_counter() - t)
for B in (1, 8):
    r = max(generate(B) for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 3))
    print(f"torch {torch.__version__} batch {B} decode tok/s {r:.0f}")

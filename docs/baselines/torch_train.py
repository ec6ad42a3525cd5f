"""The PyTorch baseline of `python -m nanojax.bench train` (issue 3), written for this comparison: nanochat's Oct-2025
GPT and optimizers in PyTorch, fp32 on the CPU: RMSNorm, RoPE, QK-norm, ReLU^2, softcap 15, untied head; Muon with
Newton-Schulz in bf16 (as nanochat, on every device) for the blocks, fused AdamW for the embedding and head, gradient
clipping 1.0. Reference tiny config: depth 4, model_dim 256, 2 heads, vocab 8192, seq 256, batch 8.

    pip install torch numpy    # not a nanojax dependency
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python docs/baselines/torch_train.py [STEPS] [--compile]

--compile compiles the model and the Newton-Schulz function, as nanochat's base_train and Muon do.
"""
import time, sys, math, torch, torch.nn as nn, torch.nn.functional as F
torch.manual_seed(0)
COMPILE = "--compile" in sys.argv
depth, D, H, V, T, B = 4, 256, 2, 8192, 256, 8
hd = D // H
def norm(x): return F.rms_norm(x, (x.size(-1),))
def rope(x, cos, sin):
    x1, x2 = x[..., :hd//2], x[..., hd//2:]
    return torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], -1)
class Block(nn.Module):
    def __init__(s):
        super().__init__()
        s.q = nn.Linear(D, D, bias=False); s.k = nn.Linear(D, D, bias=False); s.v = nn.Linear(D, D, bias=False)
        s.o = nn.Linear(D, D, bias=False); s.fc = nn.Linear(D, 4*D, bias=False); s.proj = nn.Linear(4*D, D, bias=False)
    def forward(s, x, cos, sin):
        h = norm(x)
        q = s.q(h).view(B, T, H, hd); k = s.k(h).view(B, T, H, hd); v = s.v(h).view(B, T, H, hd)
        q, k = norm(rope(q, cos, sin)), norm(rope(k, cos, sin))
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + s.o(y.transpose(1, 2).contiguous().view(B, T, D))
        return x + s.proj(F.relu(s.fc(norm(x))).square())
class GPT(nn.Module):
    def __init__(s):
        super().__init__()
        s.wte = nn.Embedding(V, D); s.blocks = nn.ModuleList(Block() for _ in range(depth))
        s.head = nn.Linear(D, V, bias=False)
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd)); f = torch.outer(torch.arange(T).float(), inv)
        s.register_buffer("cos", f.cos()[None, :, None, :]); s.register_buffer("sin", f.sin()[None, :, None, :])
    def forward(s, idx, targets):
        x = norm(s.wte(idx))
        for b in s.blocks: x = b(x, s.cos, s.sin)
        logits = s.head(norm(x)).float()
        logits = 15 * torch.tanh(logits / 15)
        return F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-1)
def _zeropower(G, steps=5):
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.bfloat16()
    if G.size(-2) > G.size(-1): X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT; Bm = b * A + c * A @ A; X = a * X + Bm @ X
    if G.size(-2) > G.size(-1): X = X.mT
    return X
zeropower = torch.compile(_zeropower) if COMPILE else _zeropower  # nanochat compiles it
class Muon(torch.optim.Optimizer):
    def __init__(s, params, lr=0.02, momentum=0.95): super().__init__(params, dict(lr=lr, momentum=momentum))
    @torch.no_grad()
    def step(s):
        for g in s.param_groups:
            for p in g["params"]:
                st = s.state[p]
                if "buf" not in st: st["buf"] = torch.zeros_like(p.grad)
                buf = st["buf"]; buf.lerp_(p.grad, 1 - g["momentum"]); gg = p.grad.lerp_(buf, g["momentum"])
                gg = zeropower(gg)
                p.add_(gg, alpha=-g["lr"] * max(1, p.size(-2) / p.size(-1)) ** 0.5)
m = GPT()
for n_, p in m.named_parameters(): torch.nn.init.normal_(p, std=0.02)
sc = (D / 768) ** -0.5
adam = torch.optim.AdamW([{"params": [m.wte.weight], "lr": 0.2 * sc}, {"params": [m.head.weight], "lr": 0.004 * sc}],
                         betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0, fused=True)
muon = Muon([p for p in m.blocks.parameters()])
model = torch.compile(m, dynamic=False) if COMPILE else m
x = torch.randint(0, V, (B, T)); y = torch.randint(0, V, (B, T))
def step():
    loss = model(x, y); loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    adam.step(); muon.step(); m.zero_grad(set_to_none=True)
    return loss.item()
for _ in range(3): step()
times = []
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 10):
    t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
times.sort(); med = times[len(times)//2]
print(f"torch {torch.__version__} threads {torch.get_num_threads()} compile={COMPILE} "
      f"step_ms {med*1e3:.1f} tok/s {B*T/med:.0f}")

"""The speedrun's presets: the one home of every number `speedrun.sh` uses (depth, vocab, batch sizes, shards, eval
flags, the CPU demo's settings) and of the arithmetic derived from them (parameters, tokens, iterations, shards to
download, device batch that fits the GPU's memory, hours and cost).

Standard library only, so that a dry run needs no installed venv:

    python -m launch.presets show d20                 # the derived numbers, for 8 x H100 when no GPU is found
    python -m launch.presets show --gpus 4 --gpu-memory-gib 40 d26
    python -m launch.presets detect                   # the preset this machine gets

The parameter and FLOP formulas repeat nanojax.gpt's for nanochat's Oct-2025 GPT (tests/test_presets.py checks them
against nanojax.gpt on every preset).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

# The best-fit packer keeps this fraction of the tokens it reads (BOS-aligned best fit crops the rest), by source and
# sequence length (`--packing stream` keeps all of them). fineweb-edu at 2048: nanochat's log measures 34.6% cropped
# for best fit, below ours on a FineWeb-like fixture (73.8% kept; docs/performance.md), so the lower figure sizes the
# shards. demo: measured over one pass of the demo's train split (vocab 4,096; 2,692,038 tokens read with BOS): 0.421
# at 256, 0.732 at 512, 0.830 at 1024, 0.906 at 2048 (its documents are ~600 tokens, FineWeb's longer). Shard counts
# are sized from it with SHARD_MARGIN.
KEPT_FRACTION = {("fineweb-edu", 2048): 0.65, ("climbmix", 2048): 0.65,
                 ("demo", 256): 0.421, ("demo", 512): 0.732, ("demo", 1024): 0.830, ("demo", 2048): 0.906}
DEMO_TRAIN_TOKENS = 2_692_038  # the demo corpus's train split at vocab 4,096, BOS included (measured as above)
SHARD_MARGIN = 1.10
CHARS_PER_SHARD = 250e6  # nanochat's shards are cut at >= 250M characters
CHARS_PER_TOKEN = 4.8  # FineWeb-EDU with a 65K-vocab tokenizer (nanochat-facts.md section 4, derived)
TOKENIZER_SHARDS = 8  # downloaded first, for the tokenizer; the rest in the background
MAX_SHARDS = {"fineweb-edu": 1822, "climbmix": 6542}  # train shards there are (the last is validation)
ASSUMED_MFU = 0.40  # for the hour estimates only: nanojax has no GPU measurement yet (nanochat's d32 logged ~51%)
REFERENCE_GPUS = (8, "H100", 80.0)  # the node nanochat's numbers are for; the estimate when no GPU is found
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
HOURLY_USD = {"H100": 3.00, "A100": 1.79, "V100": 0.55}  # per GPU-hour; nanojax.report uses the same table
DEFAULT_HOURLY_USD = 2.00
# Memory: the d20 train step at device batch 32, bf16, full remat, planned by `python -m nanojax.bench memory`
# (docs/performance.md): ~14 GiB per device on a GPU, 0.6 of it the sharded state. Activations grow with rows x
# layers x width x sequence; state (fp32 params, grads, two moments) with params / devices.
PLAN_GIB_PER_ROW_D20 = (14.0 - 0.6) / 32
STATE_BYTES_PER_PARAM = 16
MEMORY_HEADROOM = 0.85  # use at most this share of a GPU's memory by the estimate


@dataclass(frozen=True)
class Preset:
    name: str
    depth: int
    vocab_size: int
    source: str
    max_seq_len: int
    device_batch_size: int  # on an 80 GB GPU; shrunk to fit smaller ones
    total_batch_size: int = 524_288
    target_param_data_ratio: float = 20.0  # nanochat Oct-2025: 20 tokens per parameter, all parameters
    num_iterations: int = -1  # set: overrides the ratio (the CPU demo)
    tokenizer_max_chars: int = 2_000_000_000
    packing: str = "bestfit"  # launch.base --packing
    base_flags: tuple = ()  # extra launch.base flags
    eval_flags: tuple = ()  # evals.base
    chat_eval_flags: tuple = ()  # evals.chat
    chat_batch: dict = field(default_factory=dict)  # device batch of mid, sft, rl on an 80 GB GPU (none: their own)


PRESETS = {
    # The offline demo on 2 CPU cores: the embedded corpus, a depth-4 model, every stage at its CPU defaults.
    # Stream packing: at 256 tokens a row, best fit would crop 58% of the demo's ~600-token documents and wrap into a
    # second epoch before step 600; the stream uses every token once (1.2M of its 2.7M).
    "cpu": Preset("cpu", depth=4, vocab_size=4096, source="demo", max_seq_len=256, device_batch_size=8,
                  total_batch_size=2048, num_iterations=600, packing="stream",
                  base_flags=("--eval-every", "200", "--eval-tokens", "65536", "--sample-every", "200",
                              "--warmdown-ratio", "0.4"),
                  eval_flags=("--max-per-task", "16", "--split-tokens", "65536"),
                  chat_eval_flags=("--max-problems", "16", "--max-new-tokens", "64")),
    # nanochat's Oct-2025 tiers on FineWeb-EDU (speedrun.sh d20, the $300 d26, run1000.sh d32).
    "d20": Preset("d20", depth=20, vocab_size=65536, source="fineweb-edu", max_seq_len=2048, device_batch_size=32,
                  chat_batch={"mid": 32, "sft": 4, "rl": 8}),
    "d26": Preset("d26", depth=26, vocab_size=65536, source="fineweb-edu", max_seq_len=2048, device_batch_size=16,
                  chat_batch={"mid": 16, "sft": 4, "rl": 8}),
    "d32": Preset("d32", depth=32, vocab_size=65536, source="fineweb-edu", max_seq_len=2048, device_batch_size=8,
                  tokenizer_max_chars=4_000_000_000, chat_batch={"mid": 8, "sft": 4, "rl": 8}),
}


# ----------------------------------------------------------------------------------------------------------------------
# The model's size, as nanojax.gpt builds it from the depth dial (model_dim = 64 x depth, head dim 128, untied).

def model_dim(depth: int) -> int:
    return 64 * depth


def num_params(depth: int, vocab_size: int) -> int:
    D = model_dim(depth)
    return 2 * vocab_size * D + depth * 12 * D * D  # wte + lm_head; per layer q, k, v, o (4 D^2) and the MLP (8 D^2)


def flops_per_token(depth: int, vocab_size: int, seq_len: int) -> float:
    D = model_dim(depth)
    return float(6 * (num_params(depth, vocab_size) - vocab_size * D) + 12 * depth * D * seq_len)


def kept_fraction(source: str, seq_len: int) -> float:
    """The measured fraction for this source (FineWeb-EDU's for any other) at the nearest measured sequence length."""
    known = [key for key in KEPT_FRACTION if key[0] == source] or [k for k in KEPT_FRACTION if k[0] == "fineweb-edu"]
    return KEPT_FRACTION[min(known, key=lambda k: abs(math.log(k[1] / seq_len)))]


# ----------------------------------------------------------------------------------------------------------------------
# The hardware, and what the preset becomes on it.

@dataclass
class Hardware:
    gpus: int = 0
    name: str = ""
    memory_gib: float = 0.0
    detected: bool = True  # False: the reference node, assumed for a dry run on a machine without GPUs


def detect_gpus() -> Hardware:
    """nvidia-smi's view (count, first GPU's name and memory); no GPUs when it is missing or fails."""
    if not shutil.which("nvidia-smi"):
        return Hardware()
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return Hardware()
    rows = [line.rsplit(",", 1) for line in out.strip().splitlines() if "," in line]
    if not rows:
        return Hardware()
    return Hardware(gpus=len(rows), name=rows[0][0].strip(), memory_gib=float(rows[0][1]) / 1024)


def choose(hw: Hardware) -> str:
    return "d20" if hw.gpus else "cpu"


def estimate_gib(depth: int, vocab_size: int, seq_len: int, device_batch: int, devices: int) -> float:
    """Per-device memory of a train step by the d20 plan, scaled (an estimate; `bench memory` measures)."""
    per_row = PLAN_GIB_PER_ROW_D20 * (depth * model_dim(depth) * seq_len) / (20 * model_dim(20) * 2048)
    state = STATE_BYTES_PER_PARAM * num_params(depth, vocab_size) / devices / 2**30
    return state + device_batch * per_row


def mesh_size(gpus: int, total_batch: int, seq_len: int) -> int:
    """The devices a run uses: the largest count <= gpus that divides the total batch's rows (powers of two here)."""
    rows = total_batch // seq_len
    return max((n for n in range(1, max(gpus, 1) + 1) if rows % n == 0), default=1)


def fit_device_batch(p: Preset, devices: int, memory_gib: float, wanted: int | None = None, plan=None) -> int:
    """The largest device batch <= wanted (the preset's) that divides the total batch over `devices` and whose memory
    plan fits: halved until it does. `plan(batch) -> GiB` defaults to the estimate; speedrun passes bench memory."""
    plan = plan or (lambda b: estimate_gib(p.depth, p.vocab_size, p.max_seq_len, b, devices))
    rows_per_device = p.total_batch_size // p.max_seq_len // devices
    batch = min(wanted or p.device_batch_size, rows_per_device)
    while batch > 1 and (rows_per_device % batch or plan(batch) > memory_gib * MEMORY_HEADROOM):
        batch -= 1 if rows_per_device % batch else batch // 2
    return batch


def hourly_usd(hw: Hardware) -> float:
    rate = next((r for name, r in HOURLY_USD.items() if name in hw.name.upper()), DEFAULT_HOURLY_USD)
    return rate * hw.gpus


def derive(name: str, hw: Hardware) -> dict:
    """Every number the speedrun needs for this preset on this hardware."""
    if name not in PRESETS:
        raise SystemExit(f"error: NANOJAX_PRESET={name} is not one of {', '.join(PRESETS)}")
    p = PRESETS[name]
    if name != "cpu" and not hw.gpus:
        hw = Hardware(*REFERENCE_GPUS, detected=False)
    params = num_params(p.depth, p.vocab_size)
    if p.num_iterations > 0:
        iterations = p.num_iterations
    else:
        iterations = int(p.target_param_data_ratio * params) // p.total_batch_size
    tokens = iterations * p.total_batch_size
    kept = 1.0 if p.packing == "stream" else kept_fraction(p.source, p.max_seq_len)
    devices = mesh_size(hw.gpus, p.total_batch_size, p.max_seq_len) if hw.gpus else 1
    d = {"preset": name, "depth": p.depth, "vocab_size": p.vocab_size, "source": p.source, "max_seq_len": p.max_seq_len,
         "parameters": params, "flops_per_token": flops_per_token(p.depth, p.vocab_size, p.max_seq_len),
         "iterations": iterations, "tokens_per_step": p.total_batch_size, "tokens": tokens,
         "kept_fraction": kept, "tokens_read": math.ceil(tokens / kept),
         "gpus": hw.gpus, "gpu": hw.name or "none", "gpu_memory_gib": round(hw.memory_gib, 1),
         "hardware_detected": hw.detected, "mesh": devices}
    if name == "cpu":
        d.update(device_batch_size=p.device_batch_size, grad_accum=p.total_batch_size // (
            p.device_batch_size * p.max_seq_len), shards=0, estimated_hours=None, estimated_usd=None,
            chat_batch={})
        return d
    batch = fit_device_batch(p, devices, hw.memory_gib)
    shard_tokens = CHARS_PER_SHARD / CHARS_PER_TOKEN
    shards = math.ceil(d["tokens_read"] * SHARD_MARGIN / shard_tokens)
    peak = next((v for k, v in PEAK_BF16.items() if k in hw.name.upper()), None)
    hours = d["flops_per_token"] * tokens / (devices * peak * ASSUMED_MFU) / 3600 if peak else None
    d.update(device_batch_size=batch,
             estimated_memory_gib=round(estimate_gib(p.depth, p.vocab_size, p.max_seq_len, batch, devices), 1),
             grad_accum=p.total_batch_size // (batch * p.max_seq_len * devices),
             shards=min(shards, MAX_SHARDS[p.source]), shards_needed=shards, tokenizer_shards=TOKENIZER_SHARDS,
             chat_batch={s: min(b, batch) if s == "mid" else b for s, b in p.chat_batch.items()},
             estimated_hours=round(hours, 2) if hours else None,
             estimated_usd=round(hours * hourly_usd(hw), 0) if hours else None, assumed_mfu=ASSUMED_MFU)
    return d


def _short(n: float) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def describe(d: dict) -> str:
    """The derived numbers as a reader wants them (the dry run prints this)."""
    if d["hardware_detected"]:
        where = f"{d['gpus']} x {d['gpu']} ({d['gpu_memory_gib']} GiB)" if d["gpus"] else "CPU"
    else:
        where = f"no GPU found: figures for {d['gpus']} x {d['gpu']} ({d['gpu_memory_gib']:.0f} GiB), nanochat's node"
    lines = [f"preset {d['preset']} on {where}",
             f"  model: depth {d['depth']}, {d['parameters']:,} parameters, vocab {d['vocab_size']:,}, "
             f"seq len {d['max_seq_len']}, {d['flops_per_token']:.3e} FLOPs/token",
             f"  base training: {d['iterations']:,} iterations x {d['tokens_per_step']:,} tokens/step = "
             f"{d['tokens']:,} tokens ({_short(d['tokens'])}), {d['tokens'] / d['parameters']:.1f} tokens/param",
             f"  batch: device batch {d['device_batch_size']} x {d['mesh']} device(s) x accumulation {d['grad_accum']}"]
    if d["gpus"] > d["mesh"]:
        lines[-1] += f" (the total batch splits over {d['mesh']} of the {d['gpus']} GPUs)"
    if d.get("estimated_memory_gib") is not None:
        lines[-1] += f"; ~{d['estimated_memory_gib']} GiB per device (estimate; checked with bench memory)"
    if d["shards"]:
        lines.append(f"  data: {d['shards']} {d['source']} shards (~{CHARS_PER_SHARD / CHARS_PER_TOKEN / 1e6:.0f}M "
                     f"tokens each) for {d['tokens_read']:,} tokens read at kept fraction {d['kept_fraction']} "
                     f"(packer), margin {SHARD_MARGIN}")
        if d["shards_needed"] > d["shards"]:
            lines.append(f"  warning: {d['shards_needed']} shards wanted, the source has {d['shards']}: the loader "
                         f"will wrap into a second epoch")
    else:
        epochs = d["tokens_read"] / DEMO_TRAIN_TOKENS
        lines.append(f"  data: the embedded demo corpus; kept fraction {d['kept_fraction']} at seq len "
                     f"{d['max_seq_len']}, {d['tokens_read']:,} tokens read = {epochs:.2f} epochs of its "
                     f"{DEMO_TRAIN_TOKENS:,}" + (" (the loader wraps: some rows repeat)" if epochs > 1 else ""))
    if d.get("estimated_hours") is not None:
        lines.append(f"  estimate: {d['estimated_hours']:.1f} h of base training at an assumed MFU of "
                     f"{d['assumed_mfu']:.0%} (not measured), ~${d['estimated_usd']:,.0f} at "
                     f"${hourly_usd(Hardware(d['gpus'], d['gpu'])):.2f}/h; chat stages and evals add to it")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m launch.presets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["show", "json", "detect"],
                        help="show: the derived numbers; json: the same as JSON; detect: the preset for this machine")
    parser.add_argument("preset", nargs="?", default=None,
                        help=f"one of {', '.join(PRESETS)} (default: $NANOJAX_PRESET, else chosen from the hardware)")
    parser.add_argument("--gpus", type=int, default=None, help="GPU count (default: from nvidia-smi)")
    parser.add_argument("--gpu-name", default="H100", help="GPU model when --gpus is given (default: H100)")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0,
                        help="memory per GPU when --gpus is given (default: 80)")
    args = parser.parse_intermixed_args(argv)
    hw = detect_gpus() if args.gpus is None else Hardware(args.gpus, args.gpu_name if args.gpus else "",
                                                           args.gpu_memory_gib if args.gpus else 0.0)
    name = args.preset or os.environ.get("NANOJAX_PRESET") or choose(hw)
    if args.command == "detect":
        print(name)
        return
    d = derive(name, hw)
    print(json.dumps(d) if args.command == "json" else describe(d))


if __name__ == "__main__":
    main(sys.argv[1:])

"""Configs. GPTConfig: the model's shape, sized from one dial (depth) as nanochat does. TrainConfig: the knobs of a
training run and the step arithmetic derived from them."""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
from dataclasses import dataclass

from nanojax.common import UserError, check_args

PACKINGS = ("bestfit", "stream")  # how the pretraining loader makes rows (nanojax/dataloader.py)


def check_packing(packing: str):
    if packing not in PACKINGS:
        raise UserError(f"--packing {packing!r}: use one of {', '.join(PACKINGS)}")

# ----------------------------------------------------------------------------------------------------------------------
# The model.

@dataclass(frozen=True)
class GPTConfig:
    """Shape of the GPT. The vocab is used as given (no padding); model_dim == n_head * head_dim."""

    vocab_size: int
    depth: int  # number of transformer layers
    model_dim: int
    n_head: int
    n_kv_head: int  # < n_head is grouped-query attention; must divide n_head
    head_dim: int
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    softcap: float = 15.0

    def __post_init__(self):
        for name in ("vocab_size", "depth", "model_dim", "n_head", "n_kv_head", "head_dim", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_head * self.head_dim != self.model_dim:
            raise UserError(f"model_dim {self.model_dim} must equal n_head {self.n_head} x head_dim {self.head_dim}")
        if self.head_dim % 2:
            raise UserError(f"head_dim {self.head_dim} must be even (RoPE rotates pairs of channels)")
        if self.n_head % self.n_kv_head:
            raise UserError(f"n_kv_head {self.n_kv_head} must divide n_head {self.n_head} "
                            f"(allowed: {_divisors(self.n_head)})")
        for name in ("rope_theta", "softcap"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise UserError(f"GPTConfig.{name} must be a positive number, got {value!r}")

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int = 65536, n_kv_head: int | None = None, max_seq_len: int = 2048,
                   aspect_ratio: int = 64, head_dim: int = 128) -> GPTConfig:
        """nanochat's dial: model_dim = aspect_ratio x depth, split into heads of head_dim channels."""
        if isinstance(depth, bool) or not isinstance(depth, int) or depth <= 0:
            raise UserError(f"depth must be a positive integer, got {depth!r}")
        if aspect_ratio <= 0 or head_dim <= 0:
            raise UserError(f"aspect_ratio ({aspect_ratio}) and head_dim ({head_dim}) must be positive")
        model_dim = aspect_ratio * depth
        if model_dim % head_dim:
            step = head_dim // math.gcd(aspect_ratio, head_dim)
            raise UserError(f"depth {depth} x aspect ratio {aspect_ratio} = model_dim {model_dim} is not a multiple of "
                            f"head_dim {head_dim}; with these settings depth must be a multiple of {step}")
        n_head = model_dim // head_dim
        if n_kv_head is None:
            n_kv_head = n_head
        if isinstance(n_kv_head, bool) or not isinstance(n_kv_head, int) or n_kv_head <= 0 or n_head % n_kv_head:
            raise UserError(f"n_kv_head {n_kv_head!r} must divide n_head {n_head} (depth {depth}); "
                            f"allowed: {_divisors(n_head)}")
        return cls(vocab_size=vocab_size, depth=depth, model_dim=model_dim, n_head=n_head, n_kv_head=n_kv_head,
                   head_dim=head_dim, max_seq_len=max_seq_len)

    def to_dict(self) -> dict:
        """JSON-able, for checkpoint meta."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"unknown GPTConfig keys {unknown}; known: {sorted(names)}")
        try:
            return cls(**d)
        except TypeError as e:  # a required key is missing
            raise UserError(f"incomplete GPTConfig {d}: {e}") from None


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


DTYPES = ("", "float32", "bfloat16", "float16")


# ----------------------------------------------------------------------------------------------------------------------
# Run configuration: the knobs of a training stage, named as nanochat names them, and the arithmetic derived from them.

@dataclass
class TrainConfig:
    depth: int = 20
    n_kv_head: int | None = None
    max_seq_len: int = 2048
    device_batch_size: int = 32          # rows per device per micro-batch; lower it if you run out of memory
    total_batch_size: int = 524_288      # tokens per optimizer step; gradient accumulation makes up the difference
    num_iterations: int = -1             # explicit step count; else from target_flops; else from the data:param ratio
    target_flops: float = -1.0
    target_param_data_ratio: float = 20.0
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    matrix_lr: float = 0.02
    init_lr_frac: float = 1.0            # multiplies every learning rate (later stages start lower)
    grad_clip: float = 1.0               # 0: no clipping (the stages after pretraining do not clip)
    momentum_warmup: int = 300           # Muon momentum 0.85 -> 0.95 over this many steps; 0: 0.95 throughout
    remat: str = "auto"                  # recompute layer activations in the backward: auto (on accelerators, not on
                                         # CPU), full, none, or a jax.checkpoint_policies name
    warmup_ratio: float = 0.0
    warmdown_ratio: float = 0.2
    final_lr_frac: float = 0.0
    eval_every: int = 250                # -1: no evaluation during the run (still one at the end)
    eval_tokens: int = 20 * 524_288
    sample_every: int = 2000
    save_every: int = -1                 # -1: only at the end (and on SIGTERM/SIGINT)
    keep: int = 2                        # checkpoints kept per stage and tag
    mesh: str = "1"
    source: str = "demo"
    packing: str = "bestfit"             # bestfit: rows start at a document, best-fit filled, the rest cropped;
                                         # stream: one token stream cut anywhere, every token used (nanochat Oct-2025)
    run: str = ""                        # run directory name under runs/; default "<stage>-d<depth>"
    seed: int = 0
    dtype: str = ""                      # compute dtype: float32, bfloat16, float16; default NANOJAX_DTYPE, else
                                         # bfloat16 on accelerators and float32 on CPU
    resume: bool = False
    overwrite: bool = False              # a fresh run over existing checkpoints deletes them first
    wandb: bool = False                  # log to Weights & Biases when installed and logged in (nanojax.dashboards)
    tensorboard: str = ""                # write TensorBoard event files under DIR/<run>/

    def __post_init__(self):
        check_args(self, positive=("device_batch_size", "total_batch_size", "max_seq_len", "eval_tokens", "keep",
                                   "init_lr_frac"),
                   non_negative=("embedding_lr", "unembedding_lr", "matrix_lr", "grad_clip", "warmup_ratio",
                                 "warmdown_ratio", "final_lr_frac", "momentum_warmup"))
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype {self.dtype}: allowed: {', '.join(d for d in DTYPES if d)}")
        for name in ("warmup_ratio", "warmdown_ratio", "final_lr_frac"):
            if getattr(self, name) > 1:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be between 0 and 1")
        if self.remat not in ("auto", "full", "none"):
            import jax  # only to look the policy name up
            if self.remat.startswith("_") or not hasattr(jax.checkpoint_policies, self.remat):
                raise UserError(f"--remat {self.remat}: use auto, full, none or a jax.checkpoint_policies name such as "
                                f"dots_with_no_batch_dims_saveable")
        check_packing(self.packing)
        if self.warmup_ratio + self.warmdown_ratio > 1:
            raise UserError(f"--warmup-ratio {self.warmup_ratio} + --warmdown-ratio {self.warmdown_ratio} is over 1: "
                            f"warmup and warmdown together cannot be longer than the run")
        for name in ("num_iterations", "target_flops", "target_param_data_ratio"):  # -1: off, as nanochat
            if not (getattr(self, name) > 0 or getattr(self, name) == -1):
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be a positive number, or -1 "
                                f"for off")
        if self.run and (self.run in (".", "..") or not re.fullmatch(r"[\w.+-]+", self.run)):
            raise UserError(f"--run {self.run!r}: a run is a directory under runs/, so a plain name of letters, "
                            f"digits, '.', '_', '+' and '-'")

    def remat_policy(self, backend: str):
        """gpt.py's remat argument: True (recompute everything), False, or a jax.checkpoint_policies name."""
        return {"auto": backend != "cpu", "full": True, "none": False}.get(self.remat, self.remat)

    def grad_accum_steps(self, num_devices: int) -> int:
        per_pass = self.device_batch_size * self.max_seq_len * num_devices
        if per_pass <= 0 or self.total_batch_size % per_pass:
            raise UserError(f"--total-batch-size {self.total_batch_size} is not a multiple of device batch "
                            f"{self.device_batch_size} x seq len {self.max_seq_len} x {num_devices} devices = "
                            f"{per_pass} tokens; pick a total batch size that is")
        return self.total_batch_size // per_pass

    def iterations(self, num_params: int, flops_per_token: float) -> int:
        """Precedence as nanochat: --num-iterations, then --target-flops, then --target-param-data-ratio."""
        if self.num_iterations > 0:
            return self.num_iterations
        if self.target_flops > 0:
            return max(1, round(self.target_flops / (flops_per_token * self.total_batch_size)))
        if self.target_param_data_ratio > 0:
            return max(1, int(self.target_param_data_ratio * num_params) // self.total_batch_size)
        raise UserError("set one of --num-iterations, --target-flops or --target-param-data-ratio to a positive value")


# --help of every TrainConfig flag (launch.base and the chat stages); the default is added from the field.
TRAIN_HELP = {
    "depth": "the one dial: layers; width 64 x depth, heads of 128",
    "n_kv_head": "key/value heads for grouped-query attention (must divide the heads; default: as many as heads)",
    "max_seq_len": "tokens per row (context length)",
    "device_batch_size": "rows per device per micro-batch; lower it if memory runs out (accumulation makes up)",
    "total_batch_size": "tokens per optimizer step",
    "num_iterations": "optimizer steps (-1: from --target-flops, else from --target-param-data-ratio)",
    "target_flops": "training FLOPs to spend (-1: off)",
    "target_param_data_ratio": "training tokens per parameter (-1: off)",
    "embedding_lr": "AdamW learning rate of the embedding",
    "unembedding_lr": "AdamW learning rate of the output head",
    "matrix_lr": "Muon learning rate of the hidden matrices",
    "init_lr_frac": "multiplies every learning rate (later stages start lower)",
    "momentum_warmup": "steps over which Muon's momentum rises from 0.85 to 0.95 (0: 0.95 throughout)",
    "grad_clip": "clip the gradient's global norm to this (0: off)",
    "remat": "recompute activations in the backward: auto (on accelerators), full, none, or a jax.checkpoint_policies name",
    "warmup_ratio": "share of the steps warming the learning rate up",
    "warmdown_ratio": "share of the steps decaying it at the end",
    "final_lr_frac": "learning rate at the end, as a share of the peak",
    "eval_every": "steps between validation bits-per-byte evaluations (-1: only at the end)",
    "eval_tokens": "validation tokens per evaluation",
    "sample_every": "steps between greedy samples (-1: none)",
    "save_every": "steps between checkpoints (-1: only at the end and on Ctrl-C/SIGTERM)",
    "keep": "checkpoints kept per stage and depth",
    "mesh": "devices: N (data parallel, state sharded), or axes such as data:2,fsdp:4",
    "packing": "how documents become rows: bestfit (each row starts at a document, the leftover cropped) or stream "
               "(every token once, rows cut anywhere)",
    "source": "training data: climbmix, fineweb-edu, demo, or a path to .parquet/.txt/.jsonl files",
    "run": "run directory under runs/ (default: <stage>-d<depth>)",
    "seed": "random seed of the initialisation and sampling",
    "dtype": "compute dtype: float32, bfloat16 or float16 (default: NANOJAX_DTYPE, else bfloat16 on accelerators, "
             "float32 on CPU)",
    "resume": "continue the latest checkpoint of this stage and depth exactly",
    "overwrite": "start fresh over existing checkpoints of this stage and depth (deletes them)",
    "wandb": "log to Weights & Biases when wandb is installed and logged in (a one-line note otherwise)",
    "tensorboard": "write TensorBoard event files under DIR/<run>/ (default: none)",
}


def add_dataclass_args(parser, cls, defaults: dict | None = None, helps: dict | None = None,
                       only: tuple | None = None):
    """One kebab-case flag per dataclass field (`device_batch_size` -> `--device-batch-size`), its help from `helps`
    (over TRAIN_HELP for TrainConfig) and its default; `only`: the fields a command offers (the rest keep their
    defaults)."""
    defaults = defaults or {}
    helps = {**(TRAIN_HELP if cls is TrainConfig else {}), **(helps or {})}
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        default = defaults.get(f.name, f.default)
        flag = "--" + f.name.replace("_", "-")
        text = helps.get(f.name, "")
        if default not in (None, "") and "(default" not in text:
            text = f"{text} (default: {default!r})".strip()
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            kind = {"int": int, "float": float, "str": str, "int | None": int}.get(str(f.type), str)
            parser.add_argument(flag, type=kind, default=default, metavar=f.name.upper(), help=text or None)
    return parser


def from_args(cls, namespace, defaults: dict | None = None):
    """The dataclass from parsed flags; fields the command does not offer take `defaults`, else the field default."""
    defaults = defaults or {}
    return cls(**{f.name: getattr(namespace, f.name, defaults.get(f.name, f.default))
                  for f in dataclasses.fields(cls)})

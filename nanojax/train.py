"""The one training loop, shared by base pretraining, mid-training and SFT.

A stage hands `run()` a model config, a run config, a batch source and (optionally) starting params; the loop builds
the sharded optimizer, jits one step (gradient accumulation as a scan over micro-batches, donated buffers), logs one
line per step (loss, lr, tok/s, MFU, ETA) and the same numbers as JSONL, evaluates val bits-per-byte, prints samples,
checkpoints on a cadence, on SIGTERM/SIGINT and at the end, and resumes exactly from its last checkpoint.
"""
from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import asdict, dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from evals.loss import make_bpb_eval
from nanojax import checkpoint, gpt, optim
from nanojax import mesh as meshlib
from nanojax.common import UserError, atomic_write, compute_dtype, format_duration, peak_flops, print0, subdir
from nanojax.config import GPTConfig, TrainConfig


# Prompts whose greedy continuations show a base model's progress: in training logs and in evals.base.
SAMPLE_PROMPTS = ("The capital of France is", "The chemical symbol of gold is",
                  "If yesterday was Friday, then tomorrow will be", "The opposite of hot is",
                  "The planets of the solar system are:", "My favorite color is", "If 5*x + 3 = 13, then x is")


@dataclass
class Stage:
    """What differs between stages; everything else is the loop."""
    name: str                                  # "base", "mid", "sft": checkpoint directory and report section
    report_section: str                        # e.g. "Base model training"
    train_batches: Callable                    # (state or None) -> loader with next_inputs_targets(), state(), close()
    val_batches: Callable | None = None        # () -> iterable of (inputs, targets), for bits per byte
    init_params: Callable | None = None        # (model_cfg) -> params; default: fresh init
    sample_prompts: tuple = SAMPLE_PROMPTS
    extra_meta: dict | None = None


def stacked_batch_sharding(mesh):
    """(micro-batches, rows, T): rows split like any batch, the micro-batch axis whole on every device."""
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, *meshlib.batch_sharding(mesh).spec))


def make_train_step(model_cfg: GPTConfig, tx, mesh, param_sh, opt_sh, dtype, remat=True, scan_layers=None):
    """A jitted step over a stack of micro-batches (A, B, T): grads are summed over all target tokens of all
    micro-batches and divided once by their count, so accumulation equals one big batch."""
    constrain = meshlib.constrain_fn(mesh)
    batch_sh = stacked_batch_sharding(mesh)

    def summed_loss(params, inputs, targets):
        nats = gpt.token_losses(params, inputs, targets, model_cfg, dtype=dtype, constrain=constrain, remat=remat,
                                scan_layers=scan_layers)
        return nats.sum(), (targets >= 0).sum()

    loss_and_grads = jax.value_and_grad(summed_loss, has_aux=True)

    def step(params, opt_state, inputs_ABT, targets_ABT):
        def micro(carry, batch):
            grads, total, count = carry
            (nats, n), g = loss_and_grads(params, *batch)
            return (jax.tree.map(jnp.add, grads, g), total + nats, count + n), None

        if inputs_ABT.shape[0] == 1:  # no accumulation: skip the zero-initialised running sum
            (total, count), grads = loss_and_grads(params, inputs_ABT[0], targets_ABT[0])
        else:
            zeros = jax.tree.map(jnp.zeros_like, params)
            (grads, total, count), _ = jax.lax.scan(micro, (zeros, 0.0, 0), (inputs_ABT, targets_ABT))
        scale = 1.0 / jnp.maximum(count, 1)
        grads = jax.tree.map(lambda g: g * scale, grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, total * scale

    return jax.jit(step, in_shardings=(param_sh, opt_sh, batch_sh, batch_sh),
                   out_shardings=(param_sh, opt_sh, meshlib.replicated(mesh)), donate_argnums=(0, 1))


@dataclass
class StepParts:
    abstract: dict        # the params' ShapeDtypeStructs
    param_sh: dict        # their shardings
    tx: object            # the optimizer
    opt_abstract: dict
    opt_sh: dict
    step: Callable        # the jitted train step


def build_step(model_cfg: GPTConfig, cfg: TrainConfig, mesh, num_iterations: int, dtype,
               for_accelerator: bool = False) -> StepParts:
    """The optimizer, the shardings of params and optimizer state, and the jitted step of a run (also what
    `bench train` and `bench memory` time and compile). for_accelerator: build the program an accelerator would run
    (scanned layers, remat "auto" = full) whatever the backend, for `bench memory`'s plan on simulated devices."""
    axes, abstract = gpt.param_axes(model_cfg), gpt.abstract_params(model_cfg)
    param_sh = meshlib.shardings(axes, mesh, abstract)
    tx = optim.make_optimizer(abstract, model_dim=model_cfg.model_dim, num_iterations=num_iterations,
                              matrix_lr=cfg.matrix_lr, embedding_lr=cfg.embedding_lr, unembedding_lr=cfg.unembedding_lr,
                              lr_scale=cfg.lr_scale, warmup_ratio=cfg.warmup_ratio, warmdown_ratio=cfg.warmdown_ratio,
                              final_lr_frac=cfg.final_lr_frac, grad_clip=cfg.grad_clip or None, mesh=mesh,
                              param_axes=axes)
    opt_abstract = jax.eval_shape(tx.init, abstract)
    opt_sh = optim.opt_state_shardings(opt_abstract, param_sh, mesh)
    backend = "gpu" if for_accelerator else jax.default_backend()
    step = make_train_step(model_cfg, tx, mesh, param_sh, opt_sh, dtype, cfg.remat_policy(backend),
                           scan_layers=True if for_accelerator else None)
    return StepParts(abstract, param_sh, tx, opt_abstract, opt_sh, step)


def greedy_samples(engine, params, tokenizer, prompts, max_tokens: int = 16) -> list[str]:
    """A few short greedy continuations through the inference engine, for eyeballing progress."""
    engine.params = params  # the training step donates its inputs: always hand the engine the current params
    ids = [tokenizer.encode(p, prepend=tokenizer.bos_id) for p in prompts]
    sequences, _ = engine.generate_batch(ids, max_tokens=max_tokens, temperature=0.0)
    return [tokenizer.decode(seq[1:]) for seq in sequences]


class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, saves and exits cleanly. With several processes the
    flag is agreed on (one tiny all-gather per check), since a signal may reach only one host but all must save."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        print0(f"\n{self.signal} received: finishing this step, then saving a checkpoint")

    def requested(self) -> bool:
        if jax.process_count() == 1:
            return self.signal is not None
        from jax.experimental import multihost_utils
        anyone = bool(np.any(multihost_utils.process_allgather(np.int32(self.signal is not None))))
        if anyone and self.signal is None:
            self.signal = "a signal to another process"
        return anyone

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


# Flags whose change makes a resumed run differ from an uninterrupted one (mesh and device batch size do not).
TRAJECTORY_FLAGS = ("total_batch_size", "matrix_lr", "embedding_lr", "unembedding_lr", "lr_scale", "grad_clip",
                    "warmup_ratio", "warmdown_ratio", "final_lr_frac", "source", "seed")


def _note_changes(meta: dict, cfg: TrainConfig, num_iterations: int):
    saved = meta.get("run_config", {})
    changed = [f"--{k.replace('_', '-')} {saved[k]} -> {getattr(cfg, k)}" for k in TRAJECTORY_FLAGS
               if k in saved and saved[k] != getattr(cfg, k)]
    if meta.get("num_iterations") not in (None, num_iterations):
        changed.append(f"iterations {meta['num_iterations']} -> {num_iterations} (the LR schedule moves)")
    if changed:
        print0("note: resuming with changed settings, so this will not match an uninterrupted run: "
               + "; ".join(changed))
    if saved.get("mesh") not in (None, cfg.mesh):
        print0(f"note: checkpoint saved on mesh {saved['mesh']}, resuming on mesh {cfg.mesh}: restored onto the new "
               f"layout; the global batch stays {cfg.total_batch_size:,} tokens")


def _trim_metrics(path, through_step: int | None):
    """Drop records past the step we (re)start from, so a resumed run's metrics.jsonl reads as one run."""
    if jax.process_index() != 0 or not path.exists():
        return
    kept = []
    if through_step is not None:
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= through_step:
                    kept.append(line)
            except (json.JSONDecodeError, AttributeError):
                pass  # a line cut short by a kill
    with atomic_write(path, "w") as f:
        f.write("".join(line + "\n" for line in kept))


def run(stage: Stage, model_cfg: GPTConfig, cfg: TrainConfig, tokenizer) -> dict:
    meshlib.init_distributed()
    mesh = meshlib.make_mesh(cfg.mesh)
    num_devices = mesh.devices.size
    grad_accum = cfg.grad_accum_steps(num_devices)
    num_params = gpt.num_params(model_cfg)
    flops_per_token = gpt.flops_per_token(model_cfg)
    num_iterations = cfg.iterations(num_params, flops_per_token)
    dtype = compute_dtype()
    tag = f"d{model_cfg.depth}"
    run_dir = subdir("runs", cfg.run or f"{stage.name}-{tag}")
    metrics_path = run_dir / "metrics.jsonl"
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume and --overwrite contradict each other: --resume continues the checkpoints that "
                        "--overwrite would delete; pass one of them")

    print0(f"{stage.name}: {num_params:,} params, {flops_per_token:.3e} FLOPs/token, mesh {dict(mesh.shape)}, "
           f"{num_iterations:,} steps x {cfg.total_batch_size:,} tokens (grad accum {grad_accum}), "
           f"dtype {jnp.dtype(dtype).name}")

    # Params and optimizer state, sharded by the rules table, and the jitted step.
    parts = build_step(model_cfg, cfg, mesh, num_iterations, dtype)
    abstract, param_sh, opt_abstract, opt_sh, tx = (parts.abstract, parts.param_sh, parts.opt_abstract, parts.opt_sh,
                                                    parts.tx)
    lr_multiplier = optim.schedule(num_iterations, cfg.warmup_ratio, cfg.warmdown_ratio, cfg.final_lr_frac)

    # Start fresh, or continue exactly where the latest complete checkpoint left off.
    ckpt = checkpoint.StageCheckpoints(stage.name, tag, keep=cfg.keep)
    ckpt.claim()
    history = {"min_val_bpb": None, "train_time": 0.0, "timed_steps": 0, "last_loss": None, "last_val_bpb": None,
               "last_eval_step": None, "last_sample_step": None}
    start_step, loader_state = 0, None
    if cfg.resume:
        start_step, meta = ckpt.resume_point(model_cfg, tokenizer)
        if start_step >= num_iterations:
            print0(f"--resume: {ckpt.directory}/{start_step} is at step {start_step} of {num_iterations}: this run is "
                   f"already complete, nothing to do (raise --num-iterations to train further)")
            return {"complete": True, "step": start_step, "iterations": num_iterations}
        _note_changes(meta, cfg, num_iterations)
        params, opt_state, meta, data_state = ckpt.restore_for_resume(start_step, abstract, param_sh, opt_abstract,
                                                                      opt_sh)
        if int(optim.step_count(opt_state)) != start_step:
            raise UserError(f"checkpoint {ckpt.directory}/{start_step} is inconsistent: its optimizer has taken "
                            f"{int(optim.step_count(opt_state))} steps, its meta says {start_step}")
        loader_state = checkpoint.own_loader_state(data_state)
        history.update(meta.get("history", {}))
        print0(f"resumed from {ckpt.directory}/{start_step} (step {start_step} of {num_iterations})")
    else:
        ckpt.start_fresh(overwrite=cfg.overwrite)
        init = stage.init_params or (lambda c: gpt.init_params(c, seed=cfg.seed))
        params = jax.jit(init, static_argnums=0, out_shardings=param_sh)(model_cfg) if stage.init_params is None \
            else jax.device_put(init(model_cfg), param_sh)
        opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    _trim_metrics(metrics_path, start_step if cfg.resume else None)

    loader = stage.train_batches(loader_state)
    step_fn = parts.step
    bpb_eval = make_bpb_eval(model_cfg, tokenizer.token_bytes(), mesh, param_sh, dtype) if stage.val_batches else None
    peak = peak_flops(jax.devices()[0])
    batch_sh = stacked_batch_sharding(mesh)
    commit = checkpoint.git_commit()

    def next_step_batch():
        xs, ys = zip(*(loader.next_inputs_targets() for _ in range(grad_accum)))
        return tuple(jax.make_array_from_process_local_data(batch_sh, np.stack(a)) for a in (xs, ys))

    def save(step, final=False):
        meta = {"step": step, "stage": stage.name, "tag": tag, "final": final, "num_iterations": num_iterations,
                "model_config": model_cfg.to_dict(), "num_params": num_params, "run_config": asdict(cfg),
                "mesh": dict(mesh.shape), "num_processes": jax.process_count(), "tokenizer": tokenizer.fingerprint(),
                "git_commit": commit, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "history": dict(history),
                "metrics": {"loss": history["last_loss"], "val_bpb": history["last_val_bpb"],
                            "min_val_bpb": history["min_val_bpb"], "train_time": history["train_time"]},
                **(stage.extra_meta or {})}
        ckpt.save(step, params, opt_state, meta, loader.state())
        print0(f"checkpoint: {ckpt.directory}/{step}{' (final)' if final else ''}")

    def log_metrics(record):
        if jax.process_index() == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def evaluate(step):
        if bpb_eval is None:
            return None
        bpb = bpb_eval(params, stage.val_batches())
        if history["min_val_bpb"] is None or bpb < history["min_val_bpb"]:
            history["min_val_bpb"] = bpb
        history["last_val_bpb"], history["last_eval_step"] = bpb, step
        print0(f"step {step:05d} | val bpb {bpb:.4f}")
        log_metrics({"step": step, "val_bpb": bpb})
        return bpb

    engine = None

    def sample(step):
        nonlocal engine
        if engine is None:
            from nanojax.engine import Engine
            engine = Engine(params, model_cfg, tokenizer, dtype=dtype)
        for line in greedy_samples(engine, params, tokenizer, stage.sample_prompts):
            print0(f"  sample: {line!r}")
        history["last_sample_step"] = step

    def due_work(step):
        """The cadence's evals at `step`, unless already done (a resumed run repeats none and skips none)."""
        if cfg.eval_every > 0 and step % cfg.eval_every == 0 and history["last_eval_step"] != step:
            evaluate(step)
        if cfg.sample_every > 0 and step % cfg.sample_every == 0 and history["last_sample_step"] != step:
            sample(step)

    tokens_per_step = cfg.total_batch_size
    step, ema_dt, final_bpb = start_step, None, None
    t_run = time.time()
    try:
        with _StopFlag() as stop:
            if 0 < step < num_iterations:
                due_work(step)  # evals that a stop signal cut short before the save
            while step < num_iterations:
                inputs, targets = next_step_batch()
                t0 = time.time()
                params, opt_state, loss = step_fn(params, opt_state, inputs, targets)
                loss = float(loss)  # the one host sync per step
                dt = time.time() - t0
                step += 1
                if not math.isfinite(loss):
                    raise UserError(f"loss became {loss} at step {step}; lower the learning rates or check the data")
                if step > start_step + 1:  # the first step compiles: keep it out of the timings
                    history["train_time"] += dt
                    history["timed_steps"] += 1
                    ema_dt = dt if ema_dt is None else 0.9 * ema_dt + 0.1 * dt
                history["last_loss"] = loss
                tok_s = tokens_per_step / dt
                mfu = flops_per_token * tok_s / (peak * num_devices) if peak else None
                eta = (num_iterations - step) * (ema_dt or dt)
                lr = float(lr_multiplier(step - 1))
                print0(f"step {step:05d}/{num_iterations} | loss {loss:.4f} | lr x{lr:.3f} | "
                       f"dt {dt * 1000:.0f}ms | tok/s {tok_s:,.0f} | MFU {f'{100 * mfu:.1f}%' if mfu else '-'} | "
                       f"elapsed {format_duration(time.time() - t_run)} | eta {format_duration(eta)}")
                log_metrics({"step": step, "loss": loss, "lr_multiplier": lr, "dt": dt,
                             "tok_per_s": tok_s, "mfu": mfu})
                ckpt.poll()  # a save that failed in the background stops the run here, in one line
                if step == num_iterations:
                    break  # the end: a stop signal now just lets the final eval and save below finish
                stopping = stop.requested()
                if not stopping:
                    due_work(step)  # on a stop these are left for the resumed run (their step is in history)
                if stopping or stop.requested():
                    save(step)
                    ckpt.wait()
                    again = "without --overwrite, with --resume" if cfg.overwrite else "plus --resume"
                    print0(f"stopped by {stop.signal} at step {step}, saved {ckpt.directory}/{step}; continue "
                           f"with the same command {again}")
                    return {"stopped": True, "step": step}
                if cfg.save_every > 0 and step % cfg.save_every == 0:
                    save(step)

            final_bpb = evaluate(step)
            if cfg.sample_every > 0:
                sample(step)
            save(step, final=True)
            ckpt.wait()
    finally:
        ckpt.close()  # also on an error: the save in flight completes, so the last checkpoint is whole
        loader.close()

    steady, timed_steps = history["train_time"], max(1, history["timed_steps"])
    mfu = flops_per_token * tokens_per_step * timed_steps / steady / (peak * num_devices) if peak and steady else None
    peak_mem = _peak_memory()
    summary = {
        "depth": model_cfg.depth, "parameters": num_params, "FLOPs per token": f"{flops_per_token:e}",
        "iterations": num_iterations, "tokens per step": tokens_per_step,
        "training tokens": num_iterations * tokens_per_step,
        "tokens : params ratio": round(num_iterations * tokens_per_step / num_params, 2),
        "total training FLOPs": f"{flops_per_token * tokens_per_step * num_iterations:e}",
        "devices": num_devices, "mesh": cfg.mesh, "grad accumulation": grad_accum,
        "final loss": history["last_loss"], "final val bpb": final_bpb, "min val bpb": history["min_val_bpb"],
        "MFU %": round(100 * mfu, 2) if mfu else f"n/a ({jax.devices()[0].platform})",
        "training time": format_duration(steady), "peak memory per device (GiB)": peak_mem,
    }
    if start_step:
        summary["resumed from step"] = start_step
    from nanojax import report
    plot = []  # the loss curve, in the run directory and beside the report (linked by absolute path: both copies work)
    if jax.process_index() == 0 and metrics_path.exists():
        svg = subdir("report") / f"{report.slug(stage.report_section)}-loss.svg"
        if report.plot_metrics(metrics_path, svg, f"{stage.report_section}: {run_dir.name}"):
            with atomic_write(run_dir / "loss.svg", "w") as f:
                f.write(svg.read_text())
            plot = [f"![train loss and val bpb]({svg})"]
    report.log(stage.report_section, [{k: v for k, v in asdict(cfg).items()}, summary] + plot)
    with atomic_write(run_dir / "summary.json", "w") as f:
        json.dump(summary, f, indent=2, default=str)
    print0("summary: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    return summary


def _peak_memory():
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return round(peak / 2**30, 2) if peak else "n/a"

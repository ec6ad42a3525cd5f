"""The one training loop, shared by base pretraining, mid-training, SFT and the RL update.

A stage hands `run()` a `Stage` (its batches, LR schedule, evaluation, samples and starting params), a model config, a
run config and the tokenizer; the loop builds the sharded optimizer, jits one step (gradient accumulation as a scan
over micro-batches, optional per-token weights, donated buffers), logs one line per step (loss, lr, tok/s, MFU, ETA)
and the same numbers as JSONL, evaluates on a cadence, checkpoints on a cadence, on SIGTERM/SIGINT (also during an
evaluation) and at the end, and resumes exactly from its last checkpoint. The contract a stage's loader follows:

    loader = stage.train_batches(state or None)
    loader.next_step(params) -> {"inputs": (A, R, T) int32, "targets": (A, R, T) int32 (-1: no loss),
                                 optional "weights": (A, R, T) float32}      # one optimizer step, process-local
    loader.state() -> dict; loader.close(); optional loader.progress() -> [0, 1], loader.step_metrics() -> dict
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

from nanojax import checkpoint, gpt, optim, report
from nanojax import mesh as meshlib
from nanojax.common import UserError, atomic_write, compute_dtype, format_duration, peak_flops, print0, subdir
from nanojax.config import GPTConfig, TrainConfig
from nanojax.dashboards import open_dashboards


# Prompts whose greedy continuations show a base model's progress: in training logs and in evals.base.
SAMPLE_PROMPTS = ("The capital of France is", "The chemical symbol of gold is",
                  "If yesterday was Friday, then tomorrow will be", "The opposite of hot is",
                  "The planets of the solar system are:", "My favorite color is", "If 5*x + 3 = 13, then x is")


@dataclass
class Stage:
    """What differs between stages; everything else is the loop."""
    name: str                                  # "base", "mid", "sft", "rl": checkpoint directory, report section
    train_batches: Callable                    # (loader state or None) -> loader (the contract above)
    lr_schedule: Callable                      # (step, progress in [0, 1]) -> LR multiplier
    num_iterations: int | None = None          # None: until the loader is exhausted (one pass over its data)
    evaluate: Callable | None = None           # (params, step) -> {metric: float}; at 0, every --eval-every, the end
    sample: Callable | None = None             # (params, step) -> [text], every --sample-every and at the end
    init_params: Callable | None = None        # (model_cfg) -> params (the parent stage's); default: fresh init
    extra_meta: dict | None = None             # kept in every checkpoint's meta (e.g. the data mixture)
    summary: dict | None = None                # extra lines for the report section


def stacked_batch_sharding(mesh):
    """(micro-batches, rows, T): rows split like any batch, the micro-batch axis whole on every device."""
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, *meshlib.batch_sharding(mesh).spec))


def make_train_step(model_cfg: GPTConfig, tx, mesh, param_sh, opt_sh, dtype, remat=True, scan_layers=None):
    """A jitted step(params, opt_state, batch, lr_multiplier) over a stack of micro-batches (A, B, T).

    Without "weights", grads are summed over all target tokens of all micro-batches and divided once by their count,
    so accumulation equals one big batch. With "weights" (A, B, T), the loss is sum(weights x nats) as given: the
    stage normalises (RL's per-token advantages)."""
    constrain = meshlib.constrain_fn(mesh)
    batch_sh = stacked_batch_sharding(mesh)

    def summed_loss(params, batch):
        nats = gpt.token_losses(params, batch["inputs"], batch["targets"], model_cfg, dtype=dtype, constrain=constrain,
                                remat=remat, scan_layers=scan_layers)
        if "weights" in batch:
            nats = nats * batch["weights"]
        return nats.sum(), (batch["targets"] >= 0).sum()

    loss_and_grads = jax.value_and_grad(summed_loss, has_aux=True)

    def step(params, opt_state, batch_ABT, lr_multiplier):
        def micro(carry, batch):
            grads, total, count = carry
            (nats, n), g = loss_and_grads(params, batch)
            return (jax.tree.map(jnp.add, grads, g), total + nats, count + n), None

        if batch_ABT["inputs"].shape[0] == 1:  # no accumulation: skip the zero-initialised running sum
            (total, count), grads = loss_and_grads(params, jax.tree.map(lambda x: x[0], batch_ABT))
        else:
            zeros = jax.tree.map(jnp.zeros_like, params)
            (grads, total, count), _ = jax.lax.scan(micro, (zeros, 0.0, 0), batch_ABT)
        scale = 1.0 if "weights" in batch_ABT else 1.0 / jnp.maximum(count, 1)
        grads = jax.tree.map(lambda g: g * scale, grads)
        updates, opt_state = tx.update(grads, opt_state, params, lr_multiplier=lr_multiplier)
        params = optax.apply_updates(params, updates)
        return params, opt_state, total * scale

    return jax.jit(step, in_shardings=(param_sh, opt_sh, batch_sh, meshlib.replicated(mesh)),
                   out_shardings=(param_sh, opt_sh, meshlib.replicated(mesh)), donate_argnums=(0, 1))


@dataclass
class StepParts:
    abstract: dict        # the params' ShapeDtypeStructs
    param_sh: dict        # their shardings
    tx: object            # the optimizer
    opt_abstract: dict
    opt_sh: dict
    step: Callable        # the jitted train step


def param_shardings(model_cfg: GPTConfig, mesh):
    """The params' shardings on `mesh`, by the rules table (for evaluations that run beside the loop)."""
    return meshlib.shardings(gpt.param_axes(model_cfg), mesh, gpt.abstract_params(model_cfg))


def build_step(model_cfg: GPTConfig, cfg: TrainConfig, mesh, dtype, for_accelerator: bool = False) -> StepParts:
    """The optimizer, the shardings of params and optimizer state, and the jitted step of a run (also what
    `bench train` and `bench memory` time and compile). for_accelerator: build the program an accelerator would run
    (scanned layers, remat "auto" = full) whatever the backend, for `bench memory`'s plan on simulated devices."""
    axes, abstract = gpt.param_axes(model_cfg), gpt.abstract_params(model_cfg)
    param_sh = param_shardings(model_cfg, mesh)
    tx = optim.make_optimizer(abstract, model_dim=model_cfg.model_dim, matrix_lr=cfg.matrix_lr,
                              embedding_lr=cfg.embedding_lr, unembedding_lr=cfg.unembedding_lr,
                              init_lr_frac=cfg.init_lr_frac, grad_clip=cfg.grad_clip or None,
                              momentum_warmup_steps=cfg.momentum_warmup, mesh=mesh, param_axes=axes)
    opt_abstract = jax.eval_shape(tx.init, abstract)
    opt_sh = optim.opt_state_shardings(opt_abstract, param_sh, mesh)
    backend = "gpu" if for_accelerator else jax.default_backend()
    step = make_train_step(model_cfg, tx, mesh, param_sh, opt_sh, dtype, cfg.remat_policy(backend),
                           scan_layers=True if for_accelerator else None)
    return StepParts(abstract, param_sh, tx, opt_abstract, opt_sh, step)


def make_sampler(model_cfg: GPTConfig, tokenizer, prompts, *, chat: bool = False, max_tokens: int = 16, dtype=None):
    """-> sample(params, step) -> lines: greedy continuations of `prompts` (base) or the replies to them as user
    messages (chat stages), through the inference engine, for eyeballing progress."""
    if chat:
        ids = [tokenizer.render_for_completion({"messages": [{"role": "user", "content": p}]}) for p in prompts]
    else:
        ids = [tokenizer.encode(p, prepend=tokenizer.bos_id) for p in prompts]
    engine = None

    def sample(params, step):
        nonlocal engine
        if engine is None:
            from nanojax.engine import Engine
            engine = Engine(params, model_cfg, tokenizer, dtype=dtype)
        engine.params = params  # the training step donates its inputs: always hand the engine the current params
        sequences, _ = engine.generate_batch(ids, max_tokens=max_tokens, temperature=0.0)
        return [f"{p!r} -> {tokenizer.decode(seq[len(i):])!r}" for p, i, seq in zip(prompts, ids, sequences)]

    return sample


class Interrupted(Exception):
    """A stop signal arrived during an evaluation: the loop saves at once (the evaluation is redone on resume)."""


class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, saves and exits cleanly. During an evaluation the signal
    interrupts it (a preemption notice leaves ~30 s, less than a long evaluation). With several processes the flag
    is agreed on (one tiny all-gather per check), since a signal may reach only one host but all must save."""

    def __init__(self):
        self.signal = None
        self._old = {}
        self._in_eval = False

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        if self._in_eval and jax.process_count() == 1:  # (several processes must stop at the same point: they
            print0(f"\n{self.signal} received: stopping the evaluation, then saving a checkpoint")  # finish it)
            raise Interrupted
        print0(f"\n{self.signal} received: finishing this step, then saving a checkpoint")

    def interruptible(self, fn, *args):
        """fn(*args), cut short by a stop signal (raises Interrupted)."""
        if self.signal is not None and jax.process_count() == 1:
            raise Interrupted
        self._in_eval = True
        try:
            return fn(*args)
        finally:
            self._in_eval = False

    def requested(self) -> bool:
        anyone = _any_process(self.signal is not None)
        if anyone and self.signal is None:
            self.signal = "a signal to another process"
        return anyone

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


# Flags whose change makes a resumed run differ from an uninterrupted one (mesh and device batch size do not).
TRAJECTORY_FLAGS = ("total_batch_size", "matrix_lr", "embedding_lr", "unembedding_lr", "init_lr_frac", "grad_clip",
                    "momentum_warmup", "warmup_ratio", "warmdown_ratio", "final_lr_frac", "source", "packing", "seed")


def _note_changes(meta: dict, cfg: TrainConfig, num_iterations: int | None):
    saved = meta.get("run_config", {})
    changed = [f"--{k.replace('_', '-')} {saved[k]} -> {getattr(cfg, k)}" for k in TRAJECTORY_FLAGS
               if k in saved and saved[k] != getattr(cfg, k)]
    if meta.get("num_iterations") != num_iterations:
        changed.append(f"iterations {meta.get('num_iterations')} -> {num_iterations} (the LR schedule moves)")
    if changed:
        print0("note: resuming with changed settings, so this will not match an uninterrupted run: "
               + "; ".join(changed))
    if saved.get("mesh") not in (None, cfg.mesh):
        print0(f"note: checkpoint saved on mesh {saved['mesh']}, resuming on mesh {cfg.mesh}: restored onto the new "
               f"layout; the global batch stays the same")


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


def _any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def _lower_is_better(metric: str) -> bool:
    return "loss" in metric or "bpb" in metric


def _best_name(metric: str) -> str:
    """"min_val_bpb", "max_mmlu_acc": the best value an evaluation reached over the run."""
    return ("min_" if _lower_is_better(metric) else "max_") + metric


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def run(stage: Stage, model_cfg: GPTConfig, cfg: TrainConfig, tokenizer) -> dict:
    meshlib.init_distributed()
    mesh = meshlib.make_mesh(cfg.mesh)
    num_devices = mesh.devices.size
    num_params = gpt.num_params(model_cfg)
    flops_per_token = gpt.flops_per_token(model_cfg)
    num_iterations = stage.num_iterations
    dtype = compute_dtype(cfg.dtype or None)
    tag = f"d{model_cfg.depth}"
    section = report.STAGE_SECTIONS[stage.name]
    run_dir = subdir("runs", cfg.run or f"{stage.name}-{tag}")
    metrics_path = run_dir / "metrics.jsonl"
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume and --overwrite contradict each other: --resume continues the checkpoints that "
                        "--overwrite would delete; pass one of them")

    length = f"{num_iterations:,} steps" if num_iterations else "one pass over its data"
    print0(f"{stage.name}: {num_params:,} params, {flops_per_token:.3e} FLOPs/token, mesh {dict(mesh.shape)}, "
           f"{length}, dtype {jnp.dtype(dtype).name}")

    # Params and optimizer state, sharded by the rules table, and the jitted step.
    parts = build_step(model_cfg, cfg, mesh, dtype)
    abstract, param_sh, opt_abstract, opt_sh, tx = (parts.abstract, parts.param_sh, parts.opt_abstract, parts.opt_sh,
                                                    parts.tx)

    # Start fresh, or continue exactly where the latest complete checkpoint left off.
    ckpt = checkpoint.StageCheckpoints(stage.name, tag, keep=cfg.keep)
    ckpt.claim()
    history = {"train_time": 0.0, "timed_steps": 0, "last_loss": None, "evals": {}, "best": {},
               "last_eval_step": None, "last_sample_step": None, "eval_time": None, "progress": 0.0}
    start_step, loader_state = 0, None
    if cfg.resume:
        start_step, meta = ckpt.resume_point(model_cfg, tokenizer)
        if meta.get("final") or (num_iterations and start_step >= num_iterations):
            print0(f"--resume: {ckpt.directory}/{start_step} is the final checkpoint of this run (step {start_step}): "
                   f"already complete, nothing to do" + (" (raise --num-iterations to train further)"
                                                         if num_iterations else ""))
            return {"complete": True, "step": start_step, "iterations": num_iterations}
        _note_changes(meta, cfg, num_iterations)
        params, opt_state, meta, data_state = ckpt.restore_for_resume(start_step, abstract, param_sh, opt_abstract,
                                                                      opt_sh)
        if int(optim.step_count(opt_state)) != start_step:
            raise UserError(f"checkpoint {ckpt.directory}/{start_step} is inconsistent: its optimizer has taken "
                            f"{int(optim.step_count(opt_state))} steps, its meta says {start_step}")
        loader_state = checkpoint.own_loader_state(data_state)
        history.update(meta.get("history", {}))
        print0(f"resumed from {ckpt.directory}/{start_step} (step {start_step}"
               + (f" of {num_iterations})" if num_iterations else ")"))
    else:
        ckpt.start_fresh(overwrite=cfg.overwrite)
        if stage.init_params is None:
            params = jax.jit(lambda c: gpt.init_params(c, seed=cfg.seed), static_argnums=0,
                             out_shardings=param_sh)(model_cfg)
        else:
            params = jax.device_put(stage.init_params(model_cfg), param_sh)
        opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    _trim_metrics(metrics_path, start_step if cfg.resume else None)

    loader = stage.train_batches(loader_state)
    dashboards = open_dashboards(cfg, run_dir.name)
    step_fn = parts.step
    peak = peak_flops(jax.devices()[0])
    batch_sh = stacked_batch_sharding(mesh)
    commit = checkpoint.git_commit()

    def progress_of(step):
        """Share of the run done: by steps when their number is known, else by the data the loader consumed."""
        if num_iterations:
            return step / num_iterations
        return float(loader.progress()) if hasattr(loader, "progress") else 0.0

    def save(step, final=False):
        meta = {"step": step, "stage": stage.name, "tag": tag, "final": final, "num_iterations": num_iterations,
                "model_config": model_cfg.to_dict(), "num_params": num_params, "run_config": asdict(cfg),
                "mesh": dict(mesh.shape), "num_processes": jax.process_count(), "tokenizer": tokenizer.fingerprint(),
                "git_commit": commit, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "history": dict(history),
                "metrics": {"loss": history["last_loss"], **history["evals"], "train_time": history["train_time"],
                            **{_best_name(k): v for k, v in history["best"].items()}},
                **(stage.extra_meta or {})}
        ckpt.save(step, params, opt_state, meta, loader.state())
        print0(f"checkpoint: {ckpt.directory}/{step}{' (final)' if final else ''}")

    def log_metrics(record):
        dashboards.log(record["step"], record)
        if jax.process_index() == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def evaluate(step, stop):
        if stage.evaluate is None:
            return
        t0 = time.time()
        results = stop.interruptible(stage.evaluate, params, step) or {}
        took = time.time() - t0
        history["eval_time"] = took if history["eval_time"] is None else 0.5 * (history["eval_time"] + took)
        for k, v in results.items():
            best = history["best"].get(k)
            if best is None or (v < best if _lower_is_better(k) else v > best):
                history["best"][k] = v
        history["evals"], history["last_eval_step"] = dict(results), step
        print0(f"step {step:05d} | " + " | ".join(f"{k} {_fmt(v)}" for k, v in results.items())
               + f" | eval {format_duration(took)}")
        log_metrics({"step": step, **results})

    def sample(step, stop):
        if stage.sample is None:
            return
        for line in stop.interruptible(stage.sample, params, step):
            print0(f"  sample: {line}")
        history["last_sample_step"] = step

    def due_work(step, stop):
        """The cadence's evals at `step`, unless already done (a resumed run repeats none and skips none)."""
        if cfg.eval_every > 0 and step % cfg.eval_every == 0 and history["last_eval_step"] != step:
            evaluate(step, stop)
        if cfg.sample_every > 0 and step % cfg.sample_every == 0 and history["last_sample_step"] != step:
            sample(step, stop)

    def evals_left(step):
        if cfg.eval_every <= 0 or stage.evaluate is None or not num_iterations:
            return 0
        return (num_iterations - 1) // cfg.eval_every - step // cfg.eval_every + 1  # the cadence's and the final one

    def eta(step, ema_dt):
        if num_iterations:
            return (num_iterations - step) * ema_dt + evals_left(step) * (history["eval_time"] or 0.0)
        done = history["progress"]
        return history["train_time"] * (1 - done) / done if done > 0 else float("nan")

    step, ema_dt, finished = start_step, None, False
    t_run = time.time()
    try:
        with _StopFlag() as stop:
            try:
                if step < (num_iterations or math.inf):
                    due_work(step, stop)  # step 0's evals, or those a stop signal cut short before the save
                while step < (num_iterations or math.inf):
                    try:
                        local = loader.next_step(params)
                    except StopIteration:  # a single pass over the data is done
                        local = None
                    if _any_process(local is None) if num_iterations is None else local is None:
                        break  # processes run out at different steps: all stop at the first one's end (nanochat)
                    batch = {k: jax.make_array_from_process_local_data(batch_sh, np.asarray(v))
                             for k, v in local.items()}
                    tokens = int(np.prod(batch["inputs"].shape))
                    history["progress"] = progress_of(step + 1)
                    lr = float(stage.lr_schedule(step, history["progress"]))
                    t0 = time.time()
                    params, opt_state, loss = step_fn(params, opt_state, batch, np.float32(lr))
                    loss = float(loss)  # the one host sync per step
                    dt = time.time() - t0
                    step += 1
                    if not math.isfinite(loss):
                        raise UserError(f"loss became {loss} at step {step}; lower the learning rates or check the "
                                        f"data")
                    if step > start_step + 1:  # the first step compiles: keep it out of the timings
                        history["train_time"] += dt
                        history["timed_steps"] += 1
                        ema_dt = dt if ema_dt is None else 0.9 * ema_dt + 0.1 * dt
                    history["last_loss"] = loss
                    tok_s = tokens / dt
                    mfu = flops_per_token * tok_s / (peak * num_devices) if peak else None
                    extra = dict(loader.step_metrics()) if hasattr(loader, "step_metrics") else {}
                    total = f"/{num_iterations}" if num_iterations else f" ({100 * history['progress']:.1f}%)"
                    print0(f"step {step:05d}{total} | loss {loss:.4f} | lr x{lr:.3f} | "
                           + "".join(f"{k} {_fmt(v)} | " for k, v in extra.items())
                           + f"dt {dt * 1000:.0f}ms | tok/s {tok_s:,.0f} | "
                           f"MFU {f'{100 * mfu:.1f}%' if mfu else '-'} | elapsed {format_duration(time.time() - t_run)}"
                           f" | eta {format_duration(eta(step, ema_dt or dt))}")
                    log_metrics({"step": step, "loss": loss, "lr_multiplier": lr, "dt": dt, "tok_per_s": tok_s,
                                 "mfu": mfu, "progress": history["progress"], **extra})
                    if step == num_iterations:
                        break  # the end: a stop signal now just lets the final eval and save below finish
                    stopping = stop.requested()
                    if not stopping:
                        due_work(step, stop)  # on a stop these are left for the resumed run (their step is in history)
                    if stopping or stop.requested():
                        raise Interrupted
                    if cfg.save_every > 0 and step % cfg.save_every == 0:
                        save(step)
                if history["last_eval_step"] != step:
                    evaluate(step, stop)
                if cfg.sample_every > 0 and history["last_sample_step"] != step:
                    sample(step, stop)
                save(step, final=True)
                ckpt.wait()
                finished = True
            except Interrupted:
                save(step)
                ckpt.wait()
                again = "without --overwrite, with --resume" if cfg.overwrite else "plus --resume"
                print0(f"stopped by {stop.signal} at step {step}, saved {ckpt.directory}/{step}; continue with the "
                       f"same command {again}")
                return {"stopped": True, "step": step}
    finally:
        ckpt.close()  # also on an error: the save in flight completes, so the last checkpoint is whole
        loader.close()
        dashboards.close()
    assert finished

    steady, timed_steps = history["train_time"], max(1, history["timed_steps"])
    tokens_per_step = tokens if step > start_step else 0
    mfu = flops_per_token * tokens_per_step * timed_steps / steady / (peak * num_devices) if peak and steady else None
    summary = {
        "depth": model_cfg.depth, "parameters": num_params, "FLOPs per token": f"{flops_per_token:e}",
        "iterations": step, "tokens per step": tokens_per_step, "devices": num_devices, "mesh": cfg.mesh,
        "final loss": history["last_loss"], **{f"final {k.replace('_', ' ')}": v for k, v in history["evals"].items()},
        **{_best_name(k).replace("_", " "): v for k, v in history["best"].items()},
        "MFU %": round(100 * mfu, 2) if mfu else f"n/a ({jax.devices()[0].platform})",
        "training time": format_duration(steady), "peak memory per device (GiB)": _peak_memory(),
        **(stage.summary or {}),
    }
    if start_step:
        summary["resumed from step"] = start_step
    if jax.process_index() == 0 and metrics_path.exists():  # the run's own curve; the report draws its plots itself
        report.plot_metrics(metrics_path, run_dir / "loss.svg", f"{section}: {run_dir.name}")
    report.log(section, [{k: v for k, v in asdict(cfg).items()}, summary])
    with atomic_write(run_dir / "summary.json", "w") as f:
        json.dump(summary, f, indent=2, default=str)
    print0("summary: " + ", ".join(f"{k} {_fmt(v)}" for k, v in summary.items()))
    return summary


def _peak_memory():
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return round(peak / 2**30, 2) if peak else "n/a"

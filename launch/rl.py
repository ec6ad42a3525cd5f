r"""Stage 5: reinforcement learning on GSM8K with the calculator tool (nanochat's chat_rl).

    python -m launch.rl                              # from the latest SFT checkpoint (on CPU: a short demo run)
    python -m launch.rl --source mid --mesh 8        # from mid-training, on 8 devices
    python -m launch.rl --resume                     # continue an interrupted run exactly

Each step samples --num-samples completions of each of --examples-per-step training questions (temperature 1, top-k
50, at most --max-new-tokens, calculator live) in one batched engine call, rewards 1 when the "#### N" answer equals
the reference, and takes one REINFORCE step with the group-mean baseline through the training loop: no KL, no ratio
clipping, fresh optimizers at --init-lr-frac of the base learning rates decaying linearly to 0, no gradient clipping.
Every --eval-every steps (and at step 0 and the end): val_pass@1..k on --eval-examples held-out problems.

Offline, GSM8K train cannot be downloaded from Hugging Face: the run then trains on the generated "Arithmetic" word
problems (GSM8K's format, offline substitute) and evaluates on their test split, never on GSM8K test rows, and says
so in the log, the checkpoint's meta and the report.
"""
from __future__ import annotations

from launch import chat
from nanojax.common import UserError, check_args, cli, print0

# Run settings (nanochat's chat_rl: fresh optimizers at 0.05 of the base LRs, no clipping, momentum 0.95 throughout).
RUN_DEFAULTS = {"init_lr_frac": 0.05, "grad_clip": 0.0, "momentum_warmup": 0, "sample_every": -1}
# nanochat's settings (GPUs), and a short run that shows learning on the demo SFT model on 2 CPU cores.
DEFAULTS = {
    "gpu": dict(examples_per_step=16, num_samples=16, max_new_tokens=256, device_batch_size=8, num_iterations=-1,
                eval_every=60, eval_examples=400, eval_samples=8, save_every=60),
    "cpu": dict(examples_per_step=8, num_samples=8, max_new_tokens=64, device_batch_size=16, num_iterations=40,
                eval_every=20, eval_examples=32, eval_samples=4, save_every=-1),
}
TASKS = ("GSM8K", "Arithmetic")
HELPS = {"examples_per_step": "questions per step, across all processes",
         "num_samples": "completions sampled per question",
         "max_new_tokens": "longest completion",
         "eval_examples": "held-out problems per evaluation",
         "eval_samples": "samples per held-out problem: val_pass@1..this"}


def parse_args(argv=None):
    p = chat.parser("python -m launch.rl", __doc__, ("sft", "mid"))
    p.add_argument("--task", default="GSM8K", choices=TASKS,
                   help="training questions (default GSM8K; offline it falls back to Arithmetic)")
    for key, text in HELPS.items():
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None,
                       help=f"{text} (default: {DEFAULTS['gpu'][key]} on GPUs, {DEFAULTS['cpu'][key]} on CPU)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    p.add_argument("--top-k", type=int, default=50, help="sampling top-k; 0: off (default: 50)")
    backend = {k: None for k in ("device_batch_size", "num_iterations", "eval_every", "save_every")}
    chat.add_run_flags(p, {**RUN_DEFAULTS, **backend})
    for action in p._actions:  # these four default by backend here, not by the parent run
        if action.dest in backend:
            key = action.dest
            action.help = (chat.HELPS.get(key, "").split(" (default")[0] + ("; 0: a step's rows in one micro-batch"
                           if key == "device_batch_size" else "") +
                           f" (default: {DEFAULTS['gpu'][key]} on GPUs, {DEFAULTS['cpu'][key]} on CPU)")
    return p.parse_args(argv)


def fill_defaults(args, backend: str, num_devices: int):
    """Flags left unset take the backend's defaults (CPU: the demo run; else nanochat's)."""
    for key, value in DEFAULTS["cpu" if backend == "cpu" else "gpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device_batch_size == 0 and args.examples_per_step > 0 and args.num_samples > 0:
        args.device_batch_size = max(1, args.examples_per_step * args.num_samples // num_devices)
    check_args(args, positive=("examples_per_step", "num_samples", "max_new_tokens", "device_batch_size",
                               "eval_examples", "eval_samples"),
               non_negative=("temperature", "top_k"))
    if args.num_samples < 2:
        raise UserError(f"--num-samples {args.num_samples}: RL compares each sample with the others of its question "
                        f"(advantage = reward - the group's mean), so it needs at least 2")
    if not (args.num_iterations > 0 or args.num_iterations == -1):
        raise UserError(f"--num-iterations {args.num_iterations}: a positive number, or -1 for one pass")
    return args


def load_questions(task_name: str):
    """(train task, held-out task, a line saying what they are). Offline, GSM8K train becomes its generated
    substitute (evals.tasks.load_task logs the switch); evaluation then uses the substitute's test split too: the
    same kind of problem as training, and never GSM8K test rows in training."""
    from evals.tasks import get_task, load_task

    train = load_task(task_name, "train")
    if train.name != task_name:
        test = get_task(train.name, "test")
        len(test)
        return train, test, (f"offline: {task_name} train is not available without the network; training on "
                             f"{train.name} ({train.source}) and evaluating on {train.name} test")
    test = load_task(task_name, "test")
    return train, test, f"{task_name} train ({train.source}), evaluated on {task_name} test ({test.source})"


def prompts_that_fit(task, tokenizer, room: int, limit: int | None = None):
    """(rows, prompt ids) of the first `limit` rows (default all) whose prompt leaves `room` positions of the
    context for the completion."""
    rows, prompts = [], []
    for row in (task.rows if limit is None else task.rows[:limit]):
        ids = tokenizer.render_for_completion(task.to_conversation(row))
        if len(ids) <= room:
            rows.append(row)
            prompts.append(ids)
    return rows, prompts


@cli
def main(argv=None):
    args = parse_args(argv)
    import jax

    from nanojax import mesh as meshlib, rl, train
    from tokenizer import get_tokenizer

    meshlib.init_distributed()  # before any other jax call
    mesh = meshlib.make_mesh(args.mesh)  # validates the spec before loading anything
    fill_defaults(args, jax.default_backend(), mesh.devices.size)
    world, rank = jax.process_count(), jax.process_index()
    if args.examples_per_step % world:
        raise UserError(f"--examples-per-step {args.examples_per_step} does not split across {world} processes; use "
                        f"a multiple of {world}")
    path, meta, model_cfg = chat.parent_checkpoint(args.parent, args.model_tag, args.model_step)
    if args.max_new_tokens >= model_cfg.max_seq_len:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a question in the model's "
                        f"context of {model_cfg.max_seq_len} tokens")
    tok = get_tokenizer()

    train_task, test_task, data_note = load_questions(args.task)
    print0(f"rl: {data_note}")
    room = model_cfg.max_seq_len - args.max_new_tokens
    needed = args.num_iterations * args.examples_per_step if args.num_iterations > 0 else None
    rows, prompts = prompts_that_fit(train_task, tok, room, needed)  # a short run renders only what it uses
    eval_rows, eval_prompts = prompts_that_fit(test_task, tok, room, args.eval_examples)
    dropped = min(len(train_task), needed or len(train_task)) - len(rows)
    if dropped:
        print0(f"rl: {dropped} of {len(rows) + dropped} training questions are longer than {room} tokens (context "
               f"{model_cfg.max_seq_len} - --max-new-tokens {args.max_new_tokens}) and are left out")
    if not rows or not eval_rows:
        raise UserError(f"no {'training' if not rows else 'held-out'} question fits in {room} tokens; lower "
                        f"--max-new-tokens")
    num_iterations = args.num_iterations if args.num_iterations > 0 else max(1, len(rows) // args.examples_per_step)
    args.num_iterations = num_iterations
    cfg = chat.run_config(args, RUN_DEFAULTS, meta, model_cfg)

    sampler = rl.Sampler(model_cfg, tok, mesh=mesh, dtype=cfg.dtype or None)
    sampling = dict(temperature=args.temperature, top_k=args.top_k or None, max_tokens=args.max_new_tokens)
    pad_id = tok.encode_special("<|assistant_end|>")
    rows_per_micro_batch = cfg.device_batch_size * mesh.devices.size // world

    def loader(state):
        return rl.RLLoader(sampler, rows, prompts, train_task.reward, examples_per_step=args.examples_per_step,
                           num_samples=args.num_samples, rows_per_micro_batch=rows_per_micro_batch, pad_id=pad_id,
                           seed=cfg.seed, sampling=sampling, state=state, rank=rank, world=world)

    def evaluate(params, step):
        return rl.evaluate_pass_at_k(sampler, params, eval_prompts[rank::world], eval_rows[rank::world],
                                     test_task.reward, k=args.eval_samples, seed=cfg.seed, **sampling)

    about = {"parent": str(path), "task": args.task, "data": data_note,
             "substitute": train_task.name if train_task.name != args.task else None,
             "examples_per_step": args.examples_per_step, "num_samples": args.num_samples,
             "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
             "train_questions": len(rows), "eval_examples": len(eval_rows), "eval_samples": args.eval_samples}
    stage = train.Stage(
        name="rl", train_batches=loader, num_iterations=num_iterations, evaluate=evaluate,
        lr_schedule=lambda step, progress: 1.0 - step / num_iterations,
        sample=train.make_sampler(model_cfg, tok, chat.CHAT_SAMPLE_PROMPTS, chat=True, max_tokens=32,
                                  dtype=cfg.dtype or None),
        init_params=chat.parent_params(path, cfg.mesh), extra_meta={"rl": about},
        summary={"parent checkpoint": str(path), "data": data_note,
                 "questions x samples per step": f"{args.examples_per_step} x {args.num_samples}",
                 "max new tokens": args.max_new_tokens, "held-out problems": len(eval_rows)})
    print0(f"rl: from {path}; {num_iterations} steps x {args.examples_per_step} questions x {args.num_samples} "
           f"samples (max {args.max_new_tokens} new tokens); LR x{cfg.init_lr_frac} -> 0")
    train.run(stage, model_cfg, cfg, tok)


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# The whole pipeline in one go: data -> tokenizer -> base pretraining -> (later stages as they land) -> report.
# Picks a preset from the hardware: `cpu` (the offline demo on the embedded corpus) when there is no GPU, d20 on
# GPUs. NANOJAX_PRESET=cpu|d20|d26|d32 overrides. Run it inside screen/tmux on a rented node:
#   screen -L -Logfile speedrun.log -S speedrun bash speedrun.sh
set -euo pipefail
cd "$(dirname "$0")"
case "${1:-}" in
  "") ;;
  -h|--help) sed -n '2,5p' "$0" | cut -c3-; exit 0 ;;
  *) echo "speedrun.sh takes no arguments (got '$1'); pick a preset with NANOJAX_PRESET=cpu|d20|d26|d32" >&2; exit 2 ;;
esac
# Ctrl-C (or a SIGTERM to the whole job) reaches the running step too, which saves and exits 0: stop here after it
# rather than going on to evaluate an unfinished model. Running the script again continues from the checkpoint.
interrupted=""
trap 'interrupted=SIGINT' INT
trap 'interrupted=SIGTERM' TERM
run() {
  "$@"
  [ -z "$interrupted" ] || { echo "[speedrun] stopped by $interrupted; bash speedrun.sh continues" >&2; exit 130; }
}
export NANOJAX_BASE_DIR="${NANOJAX_BASE_DIR:-$HOME/.cache/nanojax}"

gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
preset="${NANOJAX_PRESET:-$([ "$gpus" -gt 0 ] && echo d20 || echo cpu)}"
case "$preset" in
  cpu) extras=dev ;;
  d20|d26|d32) extras=dev,gpu; [ "$gpus" -gt 0 ] || { echo "preset $preset needs GPUs; none found" >&2; exit 2; } ;;
  *) echo "NANOJAX_PRESET=$preset is not one of cpu, d20, d26, d32" >&2; exit 2 ;;
esac
source launch/venv.sh "$extras"
bash launch/bubblewrap.sh  # the code sandbox for HumanEval: installed when missing and possible
echo "[speedrun] preset $preset, $gpus GPU(s), base dir $NANOJAX_BASE_DIR"

case "$preset" in
  cpu)
    source=demo; vocab=4096; max_chars=2000000000
    base_args=(--depth 4 --mesh 1 --device-batch-size 8 --max-seq-len 256 --total-batch-size 2048
               --num-iterations 600 --eval-every 200 --eval-tokens 65536 --sample-every 200 --warmdown-ratio 0.4)
    eval_args=(--max-per-task 16 --split-tokens 65536); chat_eval_args=(--max-problems 16 --max-new-tokens 64) ;;
  d20) source=fineweb-edu; shards=240; vocab=65536; max_chars=2000000000
    base_args=(--depth 20 --mesh "$gpus" --device-batch-size 32); eval_args=(--mesh "$gpus"); chat_eval_args=() ;;
  d26) source=fineweb-edu; shards=450; vocab=65536; max_chars=2000000000
    base_args=(--depth 26 --mesh "$gpus" --device-batch-size 16); eval_args=(--mesh "$gpus"); chat_eval_args=() ;;
  d32) source=fineweb-edu; shards=800; vocab=65536; max_chars=4000000000
    base_args=(--depth 32 --mesh "$gpus" --device-batch-size 8); eval_args=(--mesh "$gpus"); chat_eval_args=() ;;
esac

run python -m nanojax.report reset
# Stage 1: data and tokenizer. On GPUs: a few shards for the tokenizer now, the rest in the background.
if [ "$source" = demo ]; then
  run python -m nanojax.dataset --source demo
else
  run python -m nanojax.dataset --source "$source" -n 8
  python -m nanojax.dataset --source "$source" -n "$shards" > "$NANOJAX_BASE_DIR/download.log" 2>&1 &
  download_pid=$!
fi
run python -m tokenizer.train --source "$source" --vocab-size "$vocab" --max-chars "$max_chars"
run python -m tokenizer.eval --source "$source"
[ -n "${download_pid:-}" ] && { echo "[speedrun] waiting for the shard download"; wait "$download_pid"; }

# Stage 2: base pretraining (continuing a previous run of this script if there is one), then its evaluation.
resume=()
# (a finished save only: an interrupted first save leaves just a temporary folder, which --resume cannot use)
python -c "from nanojax import checkpoint as c; exit(not c.complete_steps(c.tag_dir('base', 'd${base_args[1]}')))" \
  && resume=(--resume)
run python -m launch.base --source "$source" "${base_args[@]}" "${resume[@]}"
run python -m evals.base "${eval_args[@]}"
[ "$preset" = cpu ] && run python -m evals.chat -i base "${chat_eval_args[@]}"

# Later stages run once they exist in this checkout.
for stage in mid sft rl; do
  [ -f "launch/$stage.py" ] && run python -m "launch.$stage" --mesh "$([ "$preset" = cpu ] && echo 1 || echo "$gpus")"
done
run python -m nanojax.report generate

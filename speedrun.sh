#!/usr/bin/env bash
# The whole pipeline in one go: data, tokenizer, base, base eval, mid, chat eval, SFT, chat eval, RL, chat eval (GSM8K),
# report; then how to chat. The preset comes from the hardware (cpu: the offline demo; d20 on GPUs);
# NANOJAX_PRESET=cpu|d20|d26|d32 overrides, NANOJAX_RL=0 skips RL, NANOJAX_DRY_RUN=1 (or --dry-run) prints the plan.
# Run it again after a stop: finished stages are skipped, an interrupted training stage resumes. On a rented node:
#   screen -L -Logfile speedrun.log -S speedrun bash speedrun.sh
set -euo pipefail
cd "$(dirname "$0")"
dry_run="${NANOJAX_DRY_RUN:-0}"
case "${1:-}" in
  "") ;;
  --dry-run) dry_run=1 ;;
  -h|--help) sed -n '2,6p' "$0" | cut -c3-; exit 0 ;;
  *) echo "speedrun.sh takes only --dry-run or --help (got '$1'); pick a preset with NANOJAX_PRESET=cpu|d20|d26|d32" >&2
     exit 2 ;;
esac
export NANOJAX_BASE_DIR="${NANOJAX_BASE_DIR:-$HOME/.cache/nanojax}"

gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
preset="${NANOJAX_PRESET:-$([ "$gpus" -gt 0 ] && echo d20 || echo cpu)}"
case "$preset" in
  cpu) extras=dev ;;
  d20|d26|d32) extras=dev,gpu ;;
  *) echo "NANOJAX_PRESET=$preset is not one of cpu, d20, d26, d32" >&2; exit 2 ;;
esac
export NANOJAX_PRESET="$preset"

if [ "$dry_run" != 0 ]; then  # the venv as it is (no install); without one, the numbers (standard library only)
  [ -x .venv/bin/python ] && exec .venv/bin/python -m launch.pipeline dry-run
  python3 -m launch.presets show
  echo "(no .venv yet: the stage list and what is already done show once it exists; bash speedrun.sh creates it)"
  exit 0
fi
[ "$preset" = cpu ] || [ "$gpus" -gt 0 ] || { echo "preset $preset needs GPUs; none found (NANOJAX_DRY_RUN=1 shows its plan)" >&2
                                             exit 2; }
source launch/venv.sh "$extras"
bash launch/bubblewrap.sh  # the code sandbox for HumanEval: installed when missing and possible
python -m launch.presets show
echo "[speedrun] base dir $NANOJAX_BASE_DIR"
mapfile -t plan < <(python -m launch.pipeline plan)
[ "${#plan[@]}" -gt 0 ] || { echo "[speedrun] could not make the plan (see above)" >&2; exit 1; }

# Ctrl-C (or a SIGTERM to the whole job) reaches the running step too, which saves and exits 0: stop here after it
# rather than going on to evaluate an unfinished model. Running the script again continues from the checkpoint.
interrupted=""
trap 'interrupted=SIGINT' INT
trap 'interrupted=SIGTERM' TERM
download_pid=""
say=()
for line in "${plan[@]}"; do
  IFS=$'\t' read -r action stage text <<< "$line"
  case "$action" in
    run) echo "[speedrun] $stage: $text"
         eval "$text"
         [ -z "$interrupted" ] || { echo "[speedrun] stopped by $interrupted; bash speedrun.sh continues" >&2; exit 130; } ;;
    bg) echo "[speedrun] $stage (background, log in $NANOJAX_BASE_DIR/download.log): $text"
        eval "$text" > "$NANOJAX_BASE_DIR/download.log" 2>&1 &
        download_pid=$! ;;
    wait) if [ -n "$download_pid" ]; then
            echo "[speedrun] $text"
            wait "$download_pid" || { echo "[speedrun] the download failed; see $NANOJAX_BASE_DIR/download.log" >&2; exit 1; }
          fi ;;
    skip) echo "[speedrun] skip: $text" ;;
    say) say+=("$text") ;;
  esac
done
echo "[speedrun] done: report.md (plots in report-plots/)"
for line in "${say[@]}"; do echo "[speedrun] $line"; done

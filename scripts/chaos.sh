#!/usr/bin/env bash
# Chaos test of the run folder: kill -9 a real `tegaki train` N times at random moments, then let it
# finish, and check that it ended exactly as an uninterrupted run of the same command; then the same
# for a LoRA `tegaki finetune` of that trained model (adapter dropout on, ChatML's two tokens added:
# its random stream and its new embedding rows too must resume where they stopped):
#   - metrics.jsonl holds every step once, in order (1..STEPS), and its losses and validation
#     losses equal the uninterrupted run's bit for bit;
#   - the final checkpoint's weights are byte-identical;
#   - no temporary file, set-aside folder or lock is left behind.
#
# Usage:  scripts/chaos.sh [KILLS]        KILLS defaults to 10 a command (a few minutes on 2 CPU cores);
#         scripts/chaos.sh 50             the acceptance run of issue 12 ("50 random kills")
# Environment: STEPS (default 80 x KILLS + 50), MAX_DELAY (a kill strikes at a random moment up to
# this many seconds after the run starts training; default 2), COMMANDS (default "train finetune";
# finetune starts from train's uninterrupted run, so it needs train before it), KEEP=1 keeps the work
# folder, PYTHON (default python3).
# Exit code 0 when every check holds; 1 (with the differences) when one does not.
set -euo pipefail

KILLS=${1:-10}
STEPS=${STEPS:-$((80 * KILLS + 50))}
MAX_DELAY=${MAX_DELAY:-2}
COMMANDS=${COMMANDS:-train finetune}
PYTHON=${PYTHON:-python3}
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/tegaki-chaos.XXXXXX")
[[ "${KEEP:-0}" == 1 ]] || trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1  # one thread: the same sums every run

"$PYTHON" -c "from tegaki import data; open('$WORK/corpus.txt', 'w').write(data.shakespeare_text()[:60_000])"
# Instruction records short enough for the tiny model's 32 positions in ChatML.
"$PYTHON" -c "
import json
words = ['cat', 'dog', 'king', 'queen', 'sword', 'crown', 'rose', 'storm', 'ghost', 'night']
records = [{'instruction': f'Say {a}.', 'output': f'{a} {b}.'} for a in words for b in words[:4]]
open('$WORK/records.jsonl', 'w').write(''.join(json.dumps(r) + '\n' for r in records))
"
# A model small enough that a step takes milliseconds; a checkpoint every 3 steps (so a kill often
# lands between checkpoints and steps are redone), evaluations and samples on other steps. `exec`:
# the process started with `&` is tegaki itself, so `kill -9 $!` strikes it and not a shell around it.
train() {
  exec "$PYTHON" -m tegaki train --data "$WORK/corpus.txt" --out "$1" --max-steps "$STEPS" --set n_layer=1 \
    --set n_embd=32 --set n_head=2 --set block_size=32 --set vocab_size=320 --batch-size 2 --save-every 3 \
    --eval-every 5 --eval-batches 1 --sample-every 7 --sample-tokens 8 --keep 2 --dtype fp32 --device cpu \
    --no-progress
}
# LoRA on attention of train's uninterrupted run, with dropout on the adapters' inputs.
finetune() {
  exec "$PYTHON" -m tegaki finetune --model "$WORK/train-reference" --data "$WORK/records.jsonl" --out "$1" \
    --max-steps "$STEPS" --max-seq-len 32 --batch-size 2 --save-every 3 --eval-every 5 --lora-targets q,k,v,o \
    --lora-dropout 0.1 --lr 0.01 --dtype fp32 --device cpu --no-progress
}

# A random moment: one kill in five strikes during start-up (imports, tokenizer, shards, resume), the
# others once the run has said it is training -- waited for, not guessed, so a loaded machine's slow
# start-up does not turn every kill into one of start-up.
random_delay() { awk -v seed="$RANDOM$RANDOM" -v max="$1" 'BEGIN { srand(seed); printf "%.3f", rand() * max }'; }
wait_started() {  # until the attempt's log shows training (or the process is gone)
  until grep -qa -e "resuming from" -e "^model: " "$1" 2>/dev/null || ! kill -0 "$2" 2>/dev/null; do
    sleep 0.05
  done
}

# Kill `cmd` (train or finetune) KILLS times in $WORK/CMD-chaos, let it finish, and compare it with
# an uninterrupted run in $WORK/CMD-reference.
chaos_of() {
  local cmd=$1 kills=0 mid_write=0 finished_early=0 attempt_log pid resumes
  local run="$WORK/$cmd-chaos" log="$WORK/$cmd-chaos.log"
  echo "chaos: $KILLS kills of a $STEPS-step $cmd in $WORK"
  ("$cmd" "$WORK/$cmd-reference") >"$WORK/$cmd-reference.log" 2>&1 || { cat "$WORK/$cmd-reference.log"; return 1; }
  while ((kills < KILLS)); do
    attempt_log="$WORK/$cmd-attempt.log"
    "$cmd" "$run" >"$attempt_log" 2>&1 &
    pid=$!
    ((RANDOM % 5 == 0)) || wait_started "$attempt_log" "$pid"
    sleep "$(random_delay "$MAX_DELAY")"
    if ! kill -0 "$pid" 2>/dev/null; then  # it finished (or failed) before its kill: more steps are needed
      cat "$attempt_log" >>"$log"
      wait "$pid" || { echo "chaos: $cmd: a run failed on its own:"; tail -20 "$log"; return 1; }
      finished_early=1
      break
    fi
    kill -9 "$pid"
    wait "$pid" 2>/dev/null || true
    cat "$attempt_log" >>"$log"
    kills=$((kills + 1))
    # a temporary file or folder left by the kill: it struck in the middle of a write
    if compgen -G "$run/checkpoints/*.tmp" >/dev/null || compgen -G "$run/.*.tmp" >/dev/null \
      || compgen -G "$run/data/*.tmp" >/dev/null || compgen -G "$run/data/.*.tmp" >/dev/null \
      || compgen -G "$run/tokenizer/.*.tmp" >/dev/null; then
      mid_write=$((mid_write + 1))
    fi
  done
  if ! ("$cmd" "$run") >>"$log" 2>&1; then
    echo "chaos: $cmd: the last resume failed:"
    tail -20 "$log"
    return 1
  fi
  resumes=$(grep -ac "^resuming from" "$log" || true)
  "$PYTHON" - "$WORK" "$cmd" "$STEPS" "$kills" "$mid_write" "$resumes" "$finished_early" <<'EOF'
import hashlib, json, sys
from pathlib import Path

work, cmd, steps = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
kills, mid_write, resumes, early = map(int, sys.argv[4:])


def records(run):
    return [json.loads(line) for line in (work / run / "metrics.jsonl").read_text().splitlines()]


def final_weights(run):
    weights = work / run / "checkpoints" / f"step_{steps:06d}" / "model.safetensors"
    return hashlib.sha256(weights.read_bytes()).hexdigest()


problems = []
ref, got = records(f"{cmd}-reference"), records(f"{cmd}-chaos")
train_steps = [r["step"] for r in got if "kind" not in r]
if train_steps != list(range(1, steps + 1)):
    problems.append(f"train steps are not 1..{steps} once each, in order: {train_steps[:20]} ...")
for kind, key in ((None, "loss"), ("val", "val_loss")):
    a = [(r["step"], r[key]) for r in ref if r.get("kind") == kind]
    b = [(r["step"], r[key]) for r in got if r.get("kind") == kind]
    if a != b:
        first = next((x, y) for x, y in zip(a + [None] * len(b), b + [None] * len(a)) if x != y)
        problems.append(f"{key} differs from the uninterrupted run (first difference: {first})")
if final_weights(f"{cmd}-reference") != final_weights(f"{cmd}-chaos"):
    problems.append("the final weights differ from the uninterrupted run's")
left = [p.name for p in (work / f"{cmd}-chaos").rglob("*") if p.name.endswith((".tmp", ".old")) or p.name == ".lock"]
if left:
    problems.append(f"left behind: {left}")
print(f"chaos: {cmd}: {kills} kills ({mid_write} in the middle of a write), {resumes} resumptions; "
      f"{len(train_steps)} train steps logged, {sum(r.get('kind') == 'val' for r in got)} validations")
if early:
    print(f"chaos: {cmd}: note: the run finished after {kills} kills; raise STEPS for more")
if problems:
    print(f"chaos: {cmd}: FAILED\n  " + "\n  ".join(problems))
    sys.exit(1)
print(f"chaos: {cmd}: OK: every step once and in order, losses and final weights identical to the uninterrupted run")
EOF
}

status=0
for cmd in $COMMANDS; do
  chaos_of "$cmd" || status=1
done
exit $status

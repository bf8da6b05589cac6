#!/bin/sh
# Issue 15's measurement table for one model, class and guidance scale: the solver data each
# research solver needs is computed into a scratch copy of the model (v3 statistics, a searched
# USF schedule per NFE, a DPM-OT map per NFE at step n of a 2n-step DPM-Solver++(2M) grid), then
# bench/solver_ref.py scores DPM-Solver++ 2M/3M, UniPC, v3, the searched USF schedule and DPM-OT
# at each NFE: relative L2 against a 1000-step 2M reference on held-out noise (seed 7, not the
# search's 0/1), and with --classify (the glyph model) classifier accuracy and mode-mixture rate
# on BATCH_CLS images.
#
#   nice -n 10 bench/solver_table.sh MODEL CLASS GUIDANCE WORKDIR [classify]
#   e.g. nice -n 10 bench/solver_table.sh models/glyphs32 A 2 /tmp/table classify
#
# Wall times of stats, search and ot fit are in WORKDIR/*.log. Env: NFES (default "4 5 6 8 10"),
# BUDGET (search candidates, 100), BATCH (8), BATCH_CLS (32), BIN (build/denoised).
set -eu
model=$1 cls=$2 g=$3 work=$4 classify=${5:-}
src=$(cd "$(dirname "$0")/.." && pwd)
bin=${BIN:-$src/build/denoised}
nfes=${NFES:-4 5 6 8 10}
mkdir -p "$work"
m="$work/model"
[ -d "$m" ] || cp -r "$model" "$m"
[ -f "$m/solver_data/v3.json" ] ||
  /usr/bin/time -f "stats wall %e s" "$bin" stats --model "$m" --class "$cls" --guidance-scale "$g" \
    --out v3 --quiet >"$work/stats.log" 2>&1
[ -f "$work/data.npy" ] ||
  "$bin" sample --model "$m" --class "$cls" --guidance-scale "$g" --batch 256 --steps 50 \
    --scheduler dpm++2m --seed 0 --quiet --out "$work/data.npy"
cfg=""
for n in $nfes; do
  [ -f "$m/solver_data/usf-$n.json" ] ||
    /usr/bin/time -f "search $n wall %e s" "$bin" search --model "$m" --nfe "$n" --class "$cls" \
      --guidance-scale "$g" --budget "${BUDGET:-100}" --quiet --out "usf-$n" >>"$work/search.log" 2>&1
  [ -f "$m/solver_data/ot-$n.json" ] ||
    /usr/bin/time -f "ot $n wall %e s" "$bin" ot fit --model "$m" --class "$cls" --guidance-scale "$g" \
      --data "$work/data.npy" --samples 256 --steps $((2 * n)) --step "$n" --quiet \
      --out "ot-$n" >>"$work/ot.log" 2>&1
  cfg="$cfg --config dpm++2m:$n --config dpm++3m:$n --config unipc:$n"
  cfg="$cfg --config dpm-solver-v3:$n:v3 --config usf:$n:usf-$n --config dpm-ot:$n:ot-$n"
done
# shellcheck disable=SC2086
/usr/bin/python3 "$src/bench/solver_ref.py" --denoised "$bin" --model "$m" --class "$cls" \
  --guidance "$g" --batch "${BATCH:-8}" --seed 7 --ref dpm++2m:1000::timestep_spacing=trailing \
  $cfg --json "$work/l2.json"
if [ -n "$classify" ]; then
  # shellcheck disable=SC2086
  /usr/bin/python3 "$src/bench/solver_ref.py" --denoised "$bin" --model "$m" --class "$cls" \
    --guidance "$g" --batch "${BATCH_CLS:-32}" --seed 7 --no-ref --classify $cfg \
    --json "$work/classify.json"
fi

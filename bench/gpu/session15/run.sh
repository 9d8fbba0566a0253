#!/bin/bash
# Fifteenth session, call 3 (warm machine after session14/run.sh): look-ahead with and without the flat update,
# alternated, on LoRA on all seven (b), q/v (a) and QLoRA (d). One bench_gpu.py row per process, results in $OUT.
source .g2/stage2.sh > /dev/null || exit 1
export PYTHONUNBUFFERED=1
row() {  # row NAME ENV...: one bench_gpu.py row (ROW, default mlx:all) into $OUT/NAME
  env "${@:2}" timeout ${T:-100} python3 bench/bench_gpu.py --only ${ROW:-mlx:all} --out $OUT/$1 > $OUT/$1.log 2>&1
  grep -E "^mlx" $OUT/$1.log | tail -1 | sed "s/^/$1 /"
}
row all_la_a BENCH_FLAT_UPDATE=0 BENCH_LOOK_AHEAD=1
row all_f1la_a BENCH_FLAT_UPDATE=1 BENCH_LOOK_AHEAD=1
row all_f0_a BENCH_FLAT_UPDATE=0
ROW=mlx row qv_f0_a BENCH_FLAT_UPDATE=0
ROW=mlx row qv_f1la_a BENCH_FLAT_UPDATE=1 BENCH_LOOK_AHEAD=1
row all_la_b BENCH_FLAT_UPDATE=0 BENCH_LOOK_AHEAD=1
row all_f1la_b BENCH_FLAT_UPDATE=1 BENCH_LOOK_AHEAD=1
ROW=mlx-4bit:all row q4_f1la_a BENCH_FLAT_UPDATE=1 BENCH_LOOK_AHEAD=1
ROW=mlx-4bit:all row q4_f0_a BENCH_FLAT_UPDATE=0

#!/bin/bash
# Fourteenth session, call 2 (after `bash .g1/stage1.sh`): the flat optimizer update against the per-array one on
# the same machine, then the CUDA tests of the kernels whose sources changed. Each part bounded, results in $OUT.
source .g2/stage2.sh > /dev/null || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
timeout 40 python3 bench/probe_update.py --targets all --steps 20 --out $OUT/probe_all.json | grep -E "_ms|diff"
row() {  # row NAME ENV...: one bench_gpu.py row into $OUT/NAME
  env "${@:2}" timeout ${T:-90} python3 bench/bench_gpu.py --only ${ROW:-mlx:all} --out $OUT/$1 > $OUT/$1.log 2>&1
  python3 -c "import json,sys; r=json.load(open('$OUT/$1/bench_gpu.json'))['results']; r=r if isinstance(r,list) else list(r.values()); print('$1', *[(round(x['tokens_per_s']), round(x['peak_gb'],2), x.get('flat_update'), x.get('look_ahead')) for x in r])" 2>&1 | tail -1
}
T=120 row all_f0a BENCH_FLAT_UPDATE=0
row all_f1a BENCH_FLAT_UPDATE=1
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_lora_cuda.py "tests/test_philox.py" -k "cuda or applies" 2>&1 | tail -4
row all_f0b BENCH_FLAT_UPDATE=0
row all_f1b BENCH_FLAT_UPDATE=1
row all_f1_la BENCH_FLAT_UPDATE=1 BENCH_LOOK_AHEAD=1
timeout 60 python3 bench/probe_update.py --targets qv --steps 20 --out $OUT/probe_qv.json | grep -E "_ms|diff"

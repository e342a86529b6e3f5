#!/usr/bin/env bash
# The issue 18 device job (2026-12-01, commit 06d24a3a), kept as its record; the session ran it as
# .devrun/s18.sh (git-excluded), beside .devrun/whlA and whlB (Python 3.12 wheels: dvc, mlflow, codecarbon,
# great-expectations, pydantic, ...), pq0-pq2 (the mirror's three Parquet files, one per call) and ref/ (the
# reference recipes from their public repositories). metrics/cold_start.json: scripts/cold_start_record.py.
# Phases, one machine:
#   bash .devrun/s18.sh whl A|B        wheels into /tmp/whl (B: then pip install into /tmp/site)
#   bash .devrun/s18.sh data N         one mirror part into /tmp/mirror
#   bash .devrun/s18.sh start COMMIT   copy the tree, start the whole job in the background
#   bash .devrun/s18.sh wait           poll up to WAIT_S, then copy what exists into $OUT
# The job: default `dvc repro` on the host CPU (CUDA hidden), then on the GPU: gpu_fast's selective-TTA choice
# on validation, gpu_fast 10 seeds, hiverge's cifar10_speedrun and airbench94_muon side by side, the cold
# gpu_fast train stage, gpu_accurate 3 seeds and airbench96_faster (default compile) side by side.
set -u
export PYTHONPATH=/tmp/site:/tmp/repo/src MPLBACKEND=Agg HF_HUB_OFFLINE=1 DO_NOT_TRACK=1 PYTHONUNBUFFERED=1
R=/tmp/s18res
now() { date +%s.%N; }
case "$1" in
whl)
  mkdir -p /tmp/whl && cp .devrun/whl$2/*.whl /tmp/whl/
  if [ "$2" = B ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/whl/*.whl 2>&1 | tail -3
    # pip compiles nothing above: do it once, as a normal install would, so imports are not timed compiling
    python3 -m compileall -q -j 16 /tmp/site > /dev/null 2>&1
    python3 -c "import dvc, mlflow, codecarbon, great_expectations, pydantic; print('site ok', mlflow.__version__)"
  fi
  lscpu | grep -E 'Model name|^CPU\(s\)|Thread|NUMA node0'; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  exit 0 ;;
data)
  mkdir -p /tmp/mirror && cp .devrun/pq$2/* /tmp/mirror/ && ls -la /tmp/mirror; exit 0 ;;
start)
  rm -rf /tmp/repo $R && mkdir -p $R && cp -a "$PWD" /tmp/repo && cp .devrun/s18.sh /tmp/s18.sh
  mkdir -p /tmp/ref && cp .devrun/ref/*.py /tmp/ref/ && rm -rf /tmp/repo/.devrun && cd /tmp/repo
  mkdir -p ../shared/data && ln -sfn /tmp/mirror ../shared/data/cifar10
  git init -q . && mkdir -p .git/info && printf '/.devrun/\n' >> .git/info/exclude
  git add -A >/dev/null && git -c user.name=device -c user.email=device@localhost commit -qm snapshot
  setsid nohup bash /tmp/s18.sh job "$2" > /tmp/s18.log 2>&1 < /dev/null &
  echo $! > /tmp/s18.pid; sleep 5; tail -5 /tmp/s18.log; exit 0 ;;
job)
  commit="$2"; cd /tmp/repo
  { nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; lscpu | grep 'Model name'
    python3 -c "import torch;print('torch',torch.__version__)"; } > $R/machine.txt
  echo "repro start $(date -u +%T)"
  CUDA_VISIBLE_DEVICES= python3 -m dvc repro > $R/repro.log 2>&1; echo "repro rc=$? $(date -u +%T)"
  tar czf $R/results.tgz dvc.lock metrics reports models/cifar10
  # GPU phases in a copy: the repro's outputs stay as dvc wrote them.
  rm -rf /tmp/gpurepo && cp -a /tmp/repo /tmp/gpurepo && cd /tmp/gpurepo && export PYTHONPATH=/tmp/site:/tmp/gpurepo/src
  python3 -m cifar10_pipeline.core.params profile=gpu_fast preprocess.val_size=5000 > /dev/null
  python3 -m dvc repro preprocess > $R/prep.log 2>&1 && rm -rf /tmp/proc_val && cp -a data/processed /tmp/proc_val
  python3 -m cifar10_pipeline.core.params profile=gpu_fast > /dev/null
  python3 -m dvc repro preprocess >> $R/prep.log 2>&1 && rm -rf /tmp/proc_full && cp -a data/processed /tmp/proc_full
  echo "data ready $(date -u +%T)"
  B="python3 benchmarks/training.py"
  $B select --profile gpu_fast --key select_gpu_fast_tta --processed-dir /tmp/proc_val --grid train.tta_fraction=0.25,1.0 --seeds 6 \
    --metrics-file $R/select.json --report '' --git-commit $commit > $R/select.log 2>&1
  chosen=$(python3 -c "import json;print(json.load(open('$R/select.json'))['select_gpu_fast_tta']['chosen']['train.tta_fraction'])")
  echo "select rc=$? chosen tta_fraction=$chosen $(date -u +%T)"
  $B run --profile gpu_fast --seeds 10 -S train.tta_fraction=$chosen --processed-dir /tmp/proc_full \
    --metrics-file $R/fast.json --report '' --git-commit $commit > $R/fast.log 2>&1; echo "fast rc=$? $(date -u +%T)"
  $B reference /tmp/ref/cifar10_speedrun.py --runs 10 --timeout 400 --processed-dir /tmp/proc_full \
    --source https://github.com/hiverge/cifar10-speedrun@5cd49b1e586f473b535cdeee69fe8ad5b6e9618b \
    --metrics-file $R/fast.json --report '' --git-commit $commit > $R/hiverge.log 2>&1; echo "hiverge rc=$? $(date -u +%T)"
  $B reference /tmp/ref/airbench94_muon.py --runs 10 --timeout 400 --processed-dir /tmp/proc_full \
    --source https://github.com/KellerJordan/cifar10-airbench@f1c599c4af24aca803e3e65a6a7e52a502e09d0e \
    --metrics-file $R/fast.json --report '' --git-commit $commit > $R/ab94.log 2>&1; echo "ab94 rc=$? $(date -u +%T)"
  # The gpu_fast train stage as dvc runs it, on a cold page cache: twice (cold, then warm).
  python3 -m cifar10_pipeline.core.params profile=gpu_fast train.tta_fraction=$chosen > /dev/null
  for name in cold warm; do
    rm -rf models/checkpoints; [ $name = cold ] && { sync; echo 3 > /proc/sys/vm/drop_caches; rm -rf ~/.triton /tmp/torchinductor_*; }
    t0=$(now); python3 -m cifar10_pipeline.stages.train > $R/stage_$name.log 2>&1
    echo "stage $name rc=$? exit_s=$(awk "BEGIN{print $(now)-$t0}")" | tee -a $R/stage_times.txt
    cp metrics/train.json $R/stage_$name.train.json
  done
  python3 -X importtime -c "import cifar10_pipeline.stages.train" 2> $R/importtime.txt
  $B run --profile gpu_accurate --seeds 3 --processed-dir /tmp/proc_full \
    --metrics-file $R/accurate.json --report '' --git-commit $commit > $R/accurate.log 2>&1; echo "accurate rc=$? $(date -u +%T)"
  $B reference /tmp/ref/airbench96_faster.py --runs 3 --timeout 420 --compile-mode default --processed-dir /tmp/proc_full \
    --source https://github.com/KellerJordan/cifar10-airbench@f1c599c4af24aca803e3e65a6a7e52a502e09d0e \
    --metrics-file $R/accurate.json --report '' --git-commit $commit > $R/ab96.log 2>&1; echo "ab96 rc=$? $(date -u +%T)"
  echo "JOB DONE $(date -u +%T)"; exit 0 ;;
wait)
  deadline=$(( $(date +%s) + ${WAIT_S:-540} ))
  while kill -0 "$(cat /tmp/s18.pid)" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do
    [ -n "${UNTIL:-}" ] && grep -q "$UNTIL" /tmp/s18.log && break; sleep 3; done
  cat /tmp/s18.log; tail -4 $R/repro.log 2>/dev/null
  for f in $R/*.log $R/*.txt; do [ -f "$f" ] && { echo "== $f"; tail -4 "$f"; }; done 2>/dev/null | tail -60
  cd $R && tar czf $OUT/s18.tgz --exclude=results.tgz . 2>/dev/null; [ -f results.tgz ] && cp results.tgz $OUT/
  kill -0 "$(cat /tmp/s18.pid)" 2>/dev/null && echo STILL RUNNING; exit 0 ;;
esac

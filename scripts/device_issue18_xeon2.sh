#!/usr/bin/env bash
# The second issue 18 device job (2026-12-01, commit 84a1fcb), kept as its record; it ran as .devrun/s19.sh
# (git-excluded) beside .devrun/whlA, whlB, whlC (Python 3.12 wheels; whlC: httpx, python-multipart, pytest
# and their dependencies), pq0-pq2 (the mirror, one Parquet file per call) and ref/ (the reference recipes).
# Commit 84a1fcb had moved the default recipe to Muon; that was reverted (commit 1afb659) after this job:
# its 2-core train stage still took 19.6 min and scored lower on validation. From this job only the web
# service benchmark (metrics/serving.json, reports/serving_benchmark.md) was committed; the rest is in the
# issue 18 closing note. The device time ran out before the pinned repro's evaluate stage.
# Phases, back to back:
#   bash .devrun/s19.sh whl A|B        wheels into /tmp/whl (B: with whlC, then pip install into /tmp/site)
#   bash .devrun/s19.sh data N         one mirror part into /tmp/mirror
#   bash .devrun/s19.sh start COMMIT   copy the tree, start the job in the background
#   bash .devrun/s19.sh wait           poll up to WAIT_S (or until UNTIL appears), copy results into $OUT
# The job: the default's epoch count chosen on its validation split (GPU, one-se rule); then the default
# `dvc repro` from scratch pinned to 2 physical cores of the host CPU (CUDA hidden) while, on other cores:
# the web service benchmark pinned to 2 more physical cores, and on the GPU gpu_fast's speed knobs chosen on
# validation, gpu_fast 10 seeds, hiverge and airbench94 side by side, the cold train stage, the CUDA tests.
set -u
export PYTHONPATH=/tmp/site:/tmp/repo/src MPLBACKEND=Agg HF_HUB_OFFLINE=1 DO_NOT_TRACK=1 PYTHONUNBUFFERED=1
R=/tmp/s19res
now() { date +%s.%N; }
case "$1" in
whl)
  mkdir -p /tmp/whl && cp .devrun/whl$2/*.whl /tmp/whl/
  if [ "$2" = B ]; then
    cp .devrun/whlC/*.whl /tmp/whl/
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/whl/*.whl 2>&1 | tail -3
    python3 -m compileall -q -j 16 /tmp/site > /dev/null 2>&1
    python3 -c "import dvc, mlflow, codecarbon, great_expectations, pydantic, httpx, multipart, pytest; print('site ok', mlflow.__version__)"
  fi
  lscpu | grep -E 'Model name|^CPU\(s\)|Thread|Core|Socket|NUMA node0'; lscpu -p=CPU,CORE | grep -v '^#' | tr '\n' ' '; echo
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc
  exit 0 ;;
data)
  mkdir -p /tmp/mirror && cp .devrun/pq$2/* /tmp/mirror/ && ls -la /tmp/mirror; exit 0 ;;
start)
  rm -rf /tmp/repo $R && mkdir -p $R && cp -a "$PWD" /tmp/repo && cp .devrun/s19.sh /tmp/s19.sh
  mkdir -p /tmp/ref && cp .devrun/ref/*.py /tmp/ref/ && rm -rf /tmp/repo/.devrun && cd /tmp/repo
  mkdir -p ../shared/data && ln -sfn /tmp/mirror ../shared/data/cifar10
  git init -q . && mkdir -p .git/info && printf '/.devrun/\n' >> .git/info/exclude
  git add -A >/dev/null && git -c user.name=device -c user.email=device@localhost commit -qm snapshot
  setsid nohup bash /tmp/s19.sh job "$2" > /tmp/s19.log 2>&1 < /dev/null &
  echo $! > /tmp/s19.pid; sleep 5; tail -5 /tmp/s19.log; exit 0 ;;
job)
  commit="$2"; cd /tmp/repo
  # One logical CPU of each physical core, in order: cores 0-1 for the repro, 2-3 for the service, the rest
  # (every logical CPU of the other cores) for the GPU work.
  mapfile -t FIRST < <(lscpu -p=CPU,CORE | grep -v '^#' | sort -t, -k2,2n -k1,1n | awk -F, '!seen[$2]++{print $1}')
  REPRO_CPUS="${FIRST[0]},${FIRST[1]}"; SVC_CPUS="${FIRST[2]},${FIRST[3]}"
  busy_cores=$(lscpu -p=CPU,CORE | grep -v '^#' | awk -F, -v a="${FIRST[0]}" -v b="${FIRST[1]}" -v c="${FIRST[2]}" -v d="${FIRST[3]}" '$1==a||$1==b||$1==c||$1==d{print $2}' | sort -u | tr '\n' ' ')
  GPU_CPUS=$(lscpu -p=CPU,CORE | grep -v '^#' | awk -F, -v busy=" $busy_cores" 'index(busy" ", " "$2" ")==0{print $1}' | paste -sd,)
  { nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; lscpu | grep -E 'Model name|Flags' | cut -c1-400
    python3 -c "import torch;print('torch',torch.__version__)"
    echo "repro cpus $REPRO_CPUS service cpus $SVC_CPUS gpu-work cpus $GPU_CPUS"
    OMP_NUM_THREADS=2 taskset -c $REPRO_CPUS python3 -c "import torch,os;print('pinned torch threads',torch.get_num_threads(),'usable',len(os.sched_getaffinity(0)))"
  } > $R/machine.txt 2>&1
  cat $R/machine.txt
  G="taskset -c $GPU_CPUS"
  B="$G python3 benchmarks/training.py"
  # 1. The default's epoch count, chosen on its own validation split (2,000 images) on the GPU.
  rm -rf /tmp/gpurepo && cp -a /tmp/repo /tmp/gpurepo && cd /tmp/gpurepo && export PYTHONPATH=/tmp/site:/tmp/gpurepo/src
  $G python3 -m dvc repro preprocess > $R/prep.log 2>&1 && rm -rf /tmp/proc_def && cp -a data/processed /tmp/proc_def
  echo "default data ready $(date -u +%T)"
  $B select --profile default --key select_default_epochs --processed-dir /tmp/proc_def --rule one-se \
    --grid train.epochs=6.5,7.5,8.25 --seeds 6 -S train.device=cuda -S train.cuda_graphs=true -S train.checkpoint_every=0 \
    --metrics-file $R/select_default.json --report '' --git-commit $commit > $R/select_default.log 2>&1
  epochs=$(python3 -c "import json;print(json.load(open('$R/select_default.json'))['select_default_epochs']['chosen']['train.epochs'])")
  echo "default select rc=$? chosen epochs=$epochs $(date -u +%T)"
  # 2. The default repro from a clean slate, pinned to 2 physical cores, CUDA hidden (the committed one).
  cd /tmp/repo && export PYTHONPATH=/tmp/site:/tmp/repo/src
  python3 -m cifar10_pipeline.core.params train.epochs=$epochs > /dev/null
  ( t0=$(now); CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 taskset -c $REPRO_CPUS python3 -m dvc repro > $R/repro.log 2>&1
    echo "repro rc=$? wall_s=$(awk "BEGIN{print $(now)-$t0}") $(date -u +%T)" | tee $R/repro_time.txt
    tar czf $R/results.tgz dvc.lock params.yaml metrics reports models/cifar10 ) &
  repro_pid=$!
  echo "repro started $(date -u +%T)"
  # 3. The web service on 2 other physical cores (server and load generator share them, as on a 2-core box),
  #    with the committed model (same architecture and size as the new default's).
  rm -rf /tmp/svcrepo && cp -a /tmp/gpurepo /tmp/svcrepo && cd /tmp/svcrepo
  ( CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=2 PYTHONPATH=/tmp/site:/tmp/svcrepo/src taskset -c $SVC_CPUS python3 benchmarks/serving.py --duration 15 \
      --metrics $R/serving.json --report $R/serving_benchmark.md > $R/serving.log 2>&1; echo "service rc=$? $(date -u +%T)" ) &
  svc_pid=$!
  # 4. GPU work on the remaining cores.
  cd /tmp/gpurepo && export PYTHONPATH=/tmp/site:/tmp/gpurepo/src
  $G python3 -m cifar10_pipeline.core.params profile=gpu_fast preprocess.val_size=5000 > /dev/null
  $G python3 -m dvc repro preprocess >> $R/prep.log 2>&1 && rm -rf /tmp/proc_val && cp -a data/processed /tmp/proc_val
  $G python3 -m cifar10_pipeline.core.params profile=gpu_fast > /dev/null
  $G python3 -m dvc repro preprocess >> $R/prep.log 2>&1 && rm -rf /tmp/proc_full && cp -a data/processed /tmp/proc_full
  echo "gpu data ready $(date -u +%T)"
  $G python3 -m pytest -q -p no:cacheprovider tests/unit/test_selective_tta.py tests/model/test_training_cuda.py > $R/pytest_cuda.log 2>&1
  echo "cuda tests rc=$? $(tail -1 $R/pytest_cuda.log) $(date -u +%T)"
  $B select --profile gpu_fast --key select_gpu_fast_speed --processed-dir /tmp/proc_val --rule one-se \
    --grid train.batch_size=1536,2000 --grid train.epochs=7.6,8.25 --grid train.whiten_bias_epochs=0.2,3 \
    --grid train.tta_fraction=0.25,1.0 --seeds 6 \
    --metrics-file $R/select_fast.json --report '' --git-commit $commit > $R/select_fast.log 2>&1
  echo "fast select rc=$? $(date -u +%T)"
  sets=$(python3 -c "import json;c=json.load(open('$R/select_fast.json'))['select_gpu_fast_speed']['chosen'];print(' '.join(f'-S {k}={v}' for k,v in c.items()))")
  echo "chosen: $sets"
  $B run --profile gpu_fast --seeds 10 $sets --processed-dir /tmp/proc_full \
    --metrics-file $R/fast.json --report '' --git-commit $commit > $R/fast.log 2>&1; echo "fast rc=$? $(date -u +%T)"
  $B reference /tmp/ref/cifar10_speedrun.py --runs 10 --timeout 400 --processed-dir /tmp/proc_full \
    --source https://github.com/hiverge/cifar10-speedrun@5cd49b1e586f473b535cdeee69fe8ad5b6e9618b \
    --metrics-file $R/fast.json --report '' --git-commit $commit > $R/hiverge.log 2>&1; echo "hiverge rc=$? $(date -u +%T)"
  $B reference /tmp/ref/airbench94_muon.py --runs 10 --timeout 400 --processed-dir /tmp/proc_full \
    --source https://github.com/KellerJordan/cifar10-airbench@f1c599c4af24aca803e3e65a6a7e52a502e09d0e \
    --metrics-file $R/fast.json --report '' --git-commit $commit > $R/ab94.log 2>&1; echo "ab94 rc=$? $(date -u +%T)"
  # The gpu_fast train stage as dvc runs it: first with cold caches (Triton/Inductor caches deleted, page
  # cache dropped), then warm.
  $G python3 -m cifar10_pipeline.core.params profile=gpu_fast $(echo $sets | sed 's/-S //g') > /dev/null
  for name in cold warm; do
    rm -rf models/checkpoints; [ $name = cold ] && { sync; echo 3 > /proc/sys/vm/drop_caches; rm -rf ~/.triton /tmp/torchinductor_*; }
    t0=$(now); $G python3 -m cifar10_pipeline.stages.train > $R/stage_$name.log 2>&1
    echo "stage $name rc=$? exit_s=$(awk "BEGIN{print $(now)-$t0}")" | tee -a $R/stage_times.txt
    cp metrics/train.json $R/stage_$name.train.json
  done
  echo "GPU DONE $(date -u +%T)"
  wait $svc_pid; wait $repro_pid
  echo "JOB DONE $(date -u +%T)"; exit 0 ;;
wait)
  deadline=$(( $(date +%s) + ${WAIT_S:-540} ))
  while kill -0 "$(cat /tmp/s19.pid)" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do
    [ -n "${UNTIL:-}" ] && grep -q "$UNTIL" /tmp/s19.log && break; sleep 3; done
  cat /tmp/s19.log; tail -c 600 $R/repro.log 2>/dev/null; echo
  for f in $R/*.log $R/*.txt; do [ -f "$f" ] && { echo "== $f"; tail -c 400 "$f"; echo; }; done 2>/dev/null | tail -80
  cd $R && tar czf $OUT/s19.tgz --exclude=results.tgz . 2>/dev/null; [ -f results.tgz ] && cp results.tgz $OUT/
  kill -0 "$(cat /tmp/s19.pid)" 2>/dev/null && echo STILL RUNNING; exit 0 ;;
esac

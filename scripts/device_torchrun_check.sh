#!/usr/bin/env bash
# Copied into .devrun/ and run on the device machine (docs/gpu.md: wheels in /tmp/site, the mirror in /tmp/mirror);
# its results are metrics/torchrun/runs.json (rendered into docs/team.md).
# Device: torchrun checks. `start` copies the tree to /tmp/repo and starts the job; `wait` polls and packs.
set -u
export PYTHONPATH=/tmp/site:/tmp/repo/src MPLBACKEND=Agg HF_HUB_OFFLINE=1 DO_NOT_TRACK=1 PYTHONUNBUFFERED=1
R=/tmp/ddpres
now() { date +%s.%N; }
if [ "$1" = start ]; then
  rm -rf /tmp/repo && cp -a "$PWD" /tmp/repo && cp .devrun/ddp.sh /tmp/ddp.sh && rm -rf /tmp/repo/.devrun && cd /tmp/repo
  mkdir -p ../shared/data && ln -sfn /tmp/mirror ../shared/data/cifar10
  git init -q . && git add -A >/dev/null && git -c user.name=d -c user.email=d@l commit -qm snapshot
  setsid nohup bash /tmp/ddp.sh job > /tmp/ddp.log 2>&1 < /dev/null &
  echo $! > /tmp/ddp.pid; sleep 3; tail -3 /tmp/ddp.log; exit 0
fi
if [ "$1" = job ]; then
  cd /tmp/repo; mkdir -p $R
  nvidia-smi --query-gpu=name,driver_version --format=csv > $R/gpu.txt; lscpu | grep 'Model name' >> $R/gpu.txt
  python3 -c "import torch;print('torch',torch.__version__)" >> $R/gpu.txt
  python3 -m cifar10_pipeline.core.params profile=gpu_fast
  python3 -m dvc repro preprocess > $R/prep_gpu.log 2>&1 || { echo PREP FAILED; tail -30 $R/prep_gpu.log; exit 1; }
  for name in plain1 plain2 torchrun1; do
    rm -rf models/checkpoints
    t0=$(now)
    if [ $name = torchrun1 ]; then python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m cifar10_pipeline.stages.train > $R/$name.log 2>&1
    else python3 -m cifar10_pipeline.stages.train > $R/$name.log 2>&1; fi
    echo "$name rc=$? exit_s=$(awk "BEGIN{print $(now)-$t0}")" >> $R/times.txt
    cp metrics/train.json $R/$name.train.json; sha256sum models/cifar10/model.safetensors | sed "s/^/$name /" >> $R/sha.txt
    python3 -m cifar10_pipeline.stages.evaluate > $R/$name.eval.log 2>&1; cp metrics/eval.json $R/$name.eval.json
  done
  export CUDA_VISIBLE_DEVICES=
  python3 -m cifar10_pipeline.core.params profile=quick
  python3 -m dvc repro preprocess > $R/prep_cpu.log 2>&1 || { echo PREP FAILED; tail -30 $R/prep_cpu.log; exit 1; }
  for seed in 0 1 2; do for n in 1 2; do
    name=cpu_n${n}_s${seed}
    python3 -m cifar10_pipeline.core.params profile=quick train.seed=$seed train.nproc=$n > /dev/null
    t0=$(now); python3 -m cifar10_pipeline.stages.train > $R/$name.log 2>&1
    echo "$name rc=$? exit_s=$(awk "BEGIN{print $(now)-$t0}")" >> $R/times.txt
    cp metrics/train.json $R/$name.train.json
    python3 -m cifar10_pipeline.stages.evaluate > $R/$name.eval.log 2>&1; cp metrics/eval.json $R/$name.eval.json
  done; done
  echo JOB DONE; exit 0
fi
deadline=$(( $(date +%s) + ${WAIT_S:-540} ))
while kill -0 "$(cat /tmp/ddp.pid)" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 5; done
tail -5 /tmp/ddp.log; cat $R/times.txt 2>/dev/null
if kill -0 "$(cat /tmp/ddp.pid)" 2>/dev/null; then echo "STILL RUNNING"; fi
cd /tmp && tar czf "$OUT/ddpres.tgz" ddpres ddp.log && ls -la "$OUT"

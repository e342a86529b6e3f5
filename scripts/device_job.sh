#!/usr/bin/env bash
# One rerunnable job on the lent GPU machine (docs/gpu.md), in phases, one per device call, because at most
# 64 MiB travels per call and files there last only while the machine stays warm:
#   bash scripts/device_job.sh wheels DIR...       Python 3.12 wheels (carried folders) into /tmp/whl
#   bash scripts/device_job.sh install             pip-install /tmp/whl into /tmp/site (no index, no deps)
#   bash scripts/device_job.sh data DIR            a part of the mirror (a carried folder) into /tmp/mirror
#   bash scripts/device_job.sh start COMMIT_FILE CMD...
#                                                  copy the tree to /tmp/job/repo, copy COMMIT_FILE (written
#                                                  here by `python -m cifar10_pipeline.core.provenance`: the
#                                                  commit and whether the tree is dirty; carried) to
#                                                  /tmp/job/repo/DEVICE_COMMIT, where every record writer
#                                                  reads its commit (core/provenance.py), make the copy a git
#                                                  checkout of one snapshot commit (for dvc; not in the
#                                                  history), and run CMD there in the background (its own
#                                                  session), logging to /tmp/job/log
#   bash scripts/device_job.sh wait SECONDS PATH...
#                                                  wait up to SECONDS for CMD, print the log's tail, and pack
#                                                  the log, the machine's description and PATHs (relative to
#                                                  the repo) into $OUT/job.tgz
# Example, the default `dvc repro` on the host's CPU with CUDA hidden (how the committed results were made):
#   here:  python -m cifar10_pipeline.core.provenance > .devrun/COMMIT
#   start .devrun/COMMIT env CUDA_VISIBLE_DEVICES= python3 -m dvc repro
#   wait 540 dvc.lock params.yaml metrics reports models/cifar10
# records/README.md gives the command of each GPU record (e.g. start .devrun/COMMIT python3
# benchmarks/cold_start.py --profile gpu_fast, then wait 300 records/cold_start.json cold_start_logs).
set -euo pipefail
export PYTHONPATH=/tmp/site:/tmp/job/repo/src MPLBACKEND=Agg HF_HUB_OFFLINE=1 DO_NOT_TRACK=1 PYTHONUNBUFFERED=1
JOB=/tmp/job
phase=${1:?phase: wheels, install, data, start or wait}
shift
case "$phase" in
wheels)
  mkdir -p /tmp/whl
  for dir in "$@"; do cp "$dir"/*.whl /tmp/whl/; done
  ls /tmp/whl | wc -l ;;
install)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    /tmp/whl/*.whl
  python3 -c "import dvc, mlflow, codecarbon, great_expectations, pydantic, hydra; print('site ok')" ;;
data)
  mkdir -p /tmp/mirror && cp "$1"/* /tmp/mirror/ && ls -la /tmp/mirror ;;
start)
  commit=$(head -n 1 "$1")
  [ -n "$commit" ] || { echo "$1 holds no commit: python -m cifar10_pipeline.core.provenance > $1" >&2; exit 2; }
  rm -rf "$JOB" && mkdir -p "$JOB" && cp -a "$PWD" "$JOB/repo" && cp "$1" "$JOB/repo/DEVICE_COMMIT"
  shift
  rm -rf "$JOB/repo/.devrun" && cd "$JOB/repo"
  mkdir -p ../shared/data && ln -sfn /tmp/mirror ../shared/data/cifar10
  # The project's metadata without its code (the tree's src/ runs, from PYTHONPATH): importlib.metadata
  # then answers as in an installed checkout (core/provenance.pinned_requirement reads the pins there).
  python3 - <<'PY'
import pathlib, tomllib
project = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]
info = pathlib.Path("/tmp/site") / f"{project['name'].replace('-', '_')}-{project.get('version', '0')}.dist-info"
info.mkdir(parents=True, exist_ok=True)
lines = ["Metadata-Version: 2.1", f"Name: {project['name']}", f"Version: {project.get('version', '0')}"]
lines += [f"Requires-Dist: {r}" for r in project.get("dependencies", [])]
(info / "METADATA").write_text("\n".join(lines) + "\n")
PY
  git init -q . && git add -A > /dev/null
  git -c user.name=device -c user.email=device@localhost commit -qm "snapshot of $commit"
  {
    echo "commit $commit"
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
    lscpu | grep -E 'Model name|^CPU\(s\)|Flags' | cut -c1-300
    python3 -c "import torch; print('torch', torch.__version__, 'threads', torch.get_num_threads())"  || true
    echo "command $*"
  } > "$JOB/machine.txt" 2>&1
  setsid nohup bash -c 'started=$(date +%s); "$@"; rc=$?; echo "exit $rc after $(( $(date +%s) - started )) s" > '"$JOB"'/done' \
    job "$@" > "$JOB/log" 2>&1 < /dev/null &
  sleep 3; tail -5 "$JOB/log" ;;
wait)
  deadline=$(( $(date +%s) + ${1:?seconds} ))
  shift
  while [ ! -f "$JOB/done" ] && [ "$(date +%s)" -lt "$deadline" ]; do sleep 3; done
  cat "$JOB/machine.txt"; tail -c 3000 "$JOB/log"; cat "$JOB/done" 2>/dev/null || echo "STILL RUNNING"
  cd "$JOB/repo" && cp "$JOB/log" "$JOB/machine.txt" . && cp "$JOB/done" job_done.txt 2>/dev/null || true
  tar czf "$OUT/job.tgz" log machine.txt $(ls job_done.txt 2>/dev/null) "$@" ;;
*)
  echo "unknown phase $phase" >&2; exit 2 ;;
esac

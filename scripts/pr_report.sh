#!/usr/bin/env bash
# PR report without the GitHub API: compares BASE_REV's committed results (default HEAD) with the workspace
# and writes pr_report/report.md and pr_report/plots/ (see scripts/pr_report.py). Called by .ci/run and by
# .github/workflows/ci.yml.
#   scripts/pr_report.sh [BASE_REV]
set -euo pipefail
cd "$(dirname "$0")/.."
# The project's interpreter (its dvc is the pinned one) unless another environment is active.
python=python3
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then python=.venv/bin/python; fi
command -v "$python" >/dev/null || python=python
exec "$python" scripts/pr_report.py "$@"

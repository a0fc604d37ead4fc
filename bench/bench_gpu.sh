#!/usr/bin/env bash
# The GPU benchmark (issue 17) on a CUDA machine, as one command: install .venv when needed (.ci/setup is
# idempotent: seconds when it is there), check that its torch is a CUDA build, then run bench/bench_gpu.py.
#   bash bench/bench_gpu.sh [--images 20000] [--budget-s 420] ...   (--dry-run: the CPU parts, no GPU needed)
# Writes bench/RESULTS-gpu.md (CUDA only) and, when $OUT is set, $OUT/bench_gpu.json.
set -euo pipefail
cd "$(dirname "$0")/.."
IMGFEAT_NO_BROWSER=1 bash .ci/setup
if ! .venv/bin/python -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)'; then
  echo "bench_gpu: the torch in .venv is a CPU-only build; the GPU benchmark needs a CUDA build" \
       "(pyproject pins torch==2.14.1, a cu130 wheel where .ci/setup installs it from)" >&2
  case " $* " in *" --dry-run "*|*" --allow-cpu "*) ;; *) exit 3 ;; esac
fi
exec .venv/bin/python bench/bench_gpu.py "$@"

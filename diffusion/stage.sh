#!/bin/sh
# dvc.yaml's stage command: `sh diffusion/stage.sh <stage>` runs `diffusion <stage>`.
#
# DVC runs a stage's cmd through the shell with the caller's PATH, and a user who runs
# `.venv/bin/dvc repro` (or a flow, or `make pipeline`) has not necessarily activated
# the venv. So the command is looked up here: the repository's own .venv first (DVC_ROOT
# is the repository DVC runs in, also for a `dvc exp run --temp` copy), then PATH.
root=${DVC_ROOT:-.}
if [ -x "$root/.venv/bin/diffusion" ]; then
    exec "$root/.venv/bin/diffusion" "$@"
fi
if command -v diffusion >/dev/null 2>&1; then
    exec diffusion "$@"
fi
echo "diffusion: command not found in $root/.venv/bin or on PATH; run \`make install\` (creates .venv) or activate the environment where this package is installed" >&2
exit 127

#!/bin/bash
#
# Submit the same mlpcore training at several MPI task counts (a strong-scaling sweep).
#
#   scripts/slurm_scaling.sh                          # ntasks 1 2 4, default training args
#   scripts/slurm_scaling.sh 1 2 4 8 16 -- --strategy allreduce --epochs 5
#   scripts/slurm_scaling.sh --parallel 2 4           # independent jobs instead of a chain
#   SBATCH_PARTITION=short SBATCH_ACCOUNT=proj scripts/slurm_scaling.sh
#
# Run it from the repository root (like sbatch scripts/slurm_train.sbatch). Numbers are task
# counts (default: 1 2 4); everything after `--` is passed to mpi_train.py for every run.
# Each count is one `sbatch --ntasks=N scripts/slurm_train.sbatch` (the train script's knobs,
# ENV_KIND, VENV, LAUNCH, ... apply; sbatch options come from the usual SBATCH_* variables).
#
# By default the jobs form a chain (--dependency=afterany:<previous job>): they run one
# after another, so timings are not distorted by the runs competing for the same nodes,
# and a failed run does not stop the rest. --parallel submits them independently.
#
# Everything lands in one folder, SCALING_DIR (default runs/scaling-<date-time>):
#   SCALING_DIR/ntasks-N/results.json       the run folder of the N-task run (--out)
#   SCALING_DIR/mlpcore-<jobid>-nN.out      its job output
# so do not pass your own --out after `--` (the last --out wins and all runs would share it).
#
# Prints one line per submitted job: "ntasks=N job=JOBID out=DIR". Exit status is non-zero
# if any submission was refused (e.g. more tasks than the partition allows).

set -euo pipefail

usage() { sed -n '3,/^$/p' "$0" | sed -e '/^$/d' -e 's/^# \{0,1\}//'; }

chain=1
counts=()
while [ $# -gt 0 ]; do
    case "$1" in
        --) shift; break ;;
        --parallel) chain=0; shift ;;
        --chain) chain=1; shift ;;
        -h|--help) usage; exit 0 ;;
        ''|*[!0-9]*) echo "error: unexpected argument '$1' (task counts are integers; training args go after --)" >&2
                     exit 2 ;;
        *) counts+=("$1"); shift ;;
    esac
done
[ ${#counts[@]} -gt 0 ] || counts=(1 2 4)

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
train="$here/slurm_train.sbatch"
SCALING_DIR=${SCALING_DIR:-runs/scaling-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$SCALING_DIR"   # sbatch does not create the folder of --output

prev=""
status=0
for n in "${counts[@]}"; do
    dep=()
    if [ "$chain" = 1 ] && [ -n "$prev" ]; then
        dep=(--dependency="afterany:$prev")
    fi
    out="$SCALING_DIR/ntasks-$n"
    if jobid=$(sbatch --parsable --ntasks="$n" --job-name="mlpcore-n$n" "${dep[@]}" \
                      --output="$SCALING_DIR/mlpcore-%j-n$n.out" \
                      "$train" --out "$out" "$@"); then
        jobid=${jobid%%;*}   # --parsable prints "id" or "id;cluster"
        echo "ntasks=$n job=$jobid out=$out"
        prev=$jobid
    else
        echo "error: sbatch refused ntasks=$n" >&2
        status=1
    fi
done
exit $status

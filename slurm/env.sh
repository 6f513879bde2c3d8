# shellcheck shell=bash
# Sourced by the sbatch scripts in this folder: the environment every task of a job shares.
# Run from the repository root (sbatch keeps the submit directory as the working directory).

# The virtual environment made by `make install`; LDM_VENV points elsewhere.
# shellcheck source=/dev/null
source "${LDM_VENV:-${SLURM_SUBMIT_DIR:-.}/.venv}/bin/activate"

# One process per GPU: give each the CPUs SLURM reserved for its task, no more.
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"
# Runs, W&B files and the Optuna study go under the repository unless LDM_ROOT says otherwise.
export LDM_ROOT="${LDM_ROOT:-${SLURM_SUBMIT_DIR:-.}}"
# Fail fast instead of hanging when a rank dies inside a collective.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1

echo "job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?}: $*"

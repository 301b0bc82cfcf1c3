#!/bin/bash
# bids_fmristore on SLURM: the group level, once every participant task has succeeded.
#
# Submit after the participant array (see slurm_participant_array.sh and containers/README.md):
#   ARRAY=$(sbatch --parsable --array=0-$((N-1))%20 containers/slurm_participant_array.sh)
#   sbatch --dependency=afterok:${ARRAY%%;*} containers/slurm_group.sh
# afterok on an array job waits for all its tasks; if one fails (e.g. exit 5, some runs
# unusable), this job never starts (squeue shows DependencyNeverSatisfied): fix the inputs,
# resubmit the array (done participants are kept), then this script.
#
# Variables (as for slurm_participant_array.sh):
#   BIDS_DIR      raw BIDS dataset with participants.tsv (required)
#   OUTPUT_DIR    the participants' output dataset (required); files go to OUTPUT_DIR/group/
#   IMAGE         the .sif image (default: $HOME/images/bids_fmristore.sif)
#   BIDS_FMRISTORE_CMD
#                 run this command instead of the image, split on spaces (e.g.
#                 "python -m bids_fmristore"); IMAGE and apptainer are then not used
#   SCRATCH_DIR   node-local scratch for the work dir (default: $TMPDIR, else /tmp)
#   GROUP_ARGS    more group-level options, space-separated (e.g. "--group-mask-threshold 0.5")
#
#SBATCH --job-name=bids_fmristore_group
#SBATCH --cpus-per-task=1
#SBATCH --mem=4G
#SBATCH --time=02:00:00
#SBATCH --output=bids_fmristore_group_%j.log

set -euo pipefail

BIDS_DIR=${BIDS_DIR:?set BIDS_DIR to the raw BIDS dataset}
OUTPUT_DIR=${OUTPUT_DIR:?set OUTPUT_DIR to the output dataset of the participant level}
IMAGE=${IMAGE:-${HOME}/images/bids_fmristore.sif}
SCRATCH_DIR=${SCRATCH_DIR:-${TMPDIR:-/tmp}}
read -r -a EXTRA <<< "${GROUP_ARGS:-}"
read -r -a COMMAND <<< "${BIDS_FMRISTORE_CMD:-}"

if (( ${#COMMAND[@]} == 0 )); then
    CONTAINER=$(command -v apptainer || command -v singularity) || {
        echo "neither apptainer nor singularity is on PATH (or set BIDS_FMRISTORE_CMD)" >&2
        exit 2
    }
fi

BIDS_DIR=$(readlink -f "${BIDS_DIR}")
OUTPUT_DIR=$(readlink -f "${OUTPUT_DIR}")
WORK_DIR=$(mktemp -d "${SCRATCH_DIR}/bids_fmristore.${SLURM_JOB_ID:-job}.group.XXXXXX")
trap 'rm -rf "${WORK_DIR}"' EXIT

ARGS=("${BIDS_DIR}" "${OUTPUT_DIR}" group -w "${WORK_DIR}" ${EXTRA[@]+"${EXTRA[@]}"})

echo "group level of ${OUTPUT_DIR} on $(hostname)"
if (( ${#COMMAND[@]} > 0 )); then
    "${COMMAND[@]}" "${ARGS[@]}"
else
    "${CONTAINER}" run --cleanenv \
        -B "${BIDS_DIR}:${BIDS_DIR}:ro" -B "${OUTPUT_DIR}:${OUTPUT_DIR}" \
        -B "${WORK_DIR}:${WORK_DIR}" \
        "${IMAGE}" "${ARGS[@]}"
fi

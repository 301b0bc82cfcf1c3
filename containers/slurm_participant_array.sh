#!/bin/bash
# bids_fmristore on SLURM: one participant per array task, in the Singularity/Apptainer image.
#
# Submit (one task per row of participants.tsv, at most 20 running at once):
#   N=$(( $(wc -l < "$BIDS_DIR/participants.tsv") - 1 ))
#   sbatch --array=0-$((N-1))%20 --export=ALL,BIDS_DIR=...,OUTPUT_DIR=...,ATLAS=... \
#       containers/slurm_participant_array.sh
#
# Variables (set them in the environment, e.g. with sbatch --export, or edit the defaults):
#   BIDS_DIR      raw BIDS dataset with participants.tsv (required)
#   OUTPUT_DIR    output dataset, shared by all tasks; not inside BIDS_DIR (required)
#   ATLAS         NAME=PATH of the atlas, e.g. Schaefer100=/atlases/atlas-Schaefer100_dseg.nii.gz
#                 (required; its .tsv must sit beside it)
#   FMRIPREP_DIR  fMRIPrep derivatives (default: $BIDS_DIR/derivatives/fmriprep)
#   IMAGE         the .sif image (default: $HOME/images/bids_fmristore.sif)
#   SCRATCH_DIR   node-local scratch for the work dir (default: $TMPDIR, else /tmp)
#   EXTRA_ARGS    more bids_fmristore options, space-separated (e.g. "--store summary -v")
#
#SBATCH --job-name=bids_fmristore
#SBATCH --cpus-per-task=4
#SBATCH --mem=8G
#SBATCH --time=02:00:00
#SBATCH --output=bids_fmristore_%A_%a.log

set -euo pipefail

: "${SLURM_ARRAY_TASK_ID:?submit as an array job: sbatch --array=0-N ...}"
BIDS_DIR=${BIDS_DIR:?set BIDS_DIR to the raw BIDS dataset}
OUTPUT_DIR=${OUTPUT_DIR:?set OUTPUT_DIR (outside BIDS_DIR)}
ATLAS=${ATLAS:?set ATLAS to NAME=/path/to/atlas-NAME_dseg.nii.gz}
FMRIPREP_DIR=${FMRIPREP_DIR:-${BIDS_DIR}/derivatives/fmriprep}
IMAGE=${IMAGE:-${HOME}/images/bids_fmristore.sif}
SCRATCH_DIR=${SCRATCH_DIR:-${TMPDIR:-/tmp}}
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"

# Apptainer, or its predecessor Singularity on older clusters.
CONTAINER=$(command -v apptainer || command -v singularity) || {
    echo "neither apptainer nor singularity is on PATH" >&2
    exit 2
}

# Row TASK_ID+1 after the header; tr drops the CR of TSVs saved on Windows.
PARTICIPANT=$(tail -n +2 "${BIDS_DIR}/participants.tsv" | tr -d '\r' \
    | sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" | cut -f1)
if [[ -z "${PARTICIPANT}" ]]; then
    echo "no participant in row $((SLURM_ARRAY_TASK_ID + 1)) of ${BIDS_DIR}/participants.tsv" >&2
    exit 2
fi

mkdir -p "${OUTPUT_DIR}"
# Bind mounts need absolute paths.
BIDS_DIR=$(readlink -f "${BIDS_DIR}")
OUTPUT_DIR=$(readlink -f "${OUTPUT_DIR}")
FMRIPREP_DIR=$(readlink -f "${FMRIPREP_DIR}")
ATLAS_PATH=$(readlink -f "${ATLAS#*=}")
ATLAS="${ATLAS%%=*}=${ATLAS_PATH}"
ATLAS_DIR=$(dirname "${ATLAS_PATH}")
# Per-task work dir on node-local disk (pybids database); removed when the task ends.
WORK_DIR=$(mktemp -d "${SCRATCH_DIR}/bids_fmristore.${SLURM_ARRAY_JOB_ID:-job}.${SLURM_ARRAY_TASK_ID}.XXXXXX")
trap 'rm -rf "${WORK_DIR}"' EXIT

echo "task ${SLURM_ARRAY_TASK_ID}: ${PARTICIPANT} on $(hostname)"
# Host paths are bound at the same paths inside the container, so the paths recorded in
# OUTPUT_DIR/dataset_description.json (DatasetLinks, SourceDatasets) are valid on the host.
# --cleanenv keeps the host's PYTHONPATH and the like out of the container.
"${CONTAINER}" run --cleanenv \
    -B "${BIDS_DIR}:${BIDS_DIR}:ro" \
    -B "${FMRIPREP_DIR}:${FMRIPREP_DIR}:ro" \
    -B "${ATLAS_DIR}:${ATLAS_DIR}:ro" \
    -B "${OUTPUT_DIR}:${OUTPUT_DIR}" \
    -B "${WORK_DIR}:${WORK_DIR}" \
    "${IMAGE}" \
    "${BIDS_DIR}" "${OUTPUT_DIR}" participant \
    --participant-label "${PARTICIPANT}" \
    -d "fmriprep=${FMRIPREP_DIR}" \
    --atlas "${ATLAS}" \
    --nprocs "${SLURM_CPUS_PER_TASK:-1}" \
    -w "${WORK_DIR}" \
    ${EXTRA[@]+"${EXTRA[@]}"}

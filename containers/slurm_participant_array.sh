#!/bin/bash
# bids_fmristore on SLURM: one participant per array task, in the Singularity/Apptainer image.
#
# Submit (one task per row of participants.tsv, at most 20 running at once), then the group
# level once every task has succeeded (see containers/README.md):
#   N=$(( $(wc -l < "$BIDS_DIR/participants.tsv") - 1 ))
#   ARRAY=$(sbatch --parsable --array=0-$((N-1))%20 containers/slurm_participant_array.sh)
#   sbatch --dependency=afterok:${ARRAY%%;*} containers/slurm_group.sh
#
# Variables (set them in the environment, e.g. with sbatch --export, or edit the defaults):
#   BIDS_DIR      raw BIDS dataset with participants.tsv (required)
#   OUTPUT_DIR    output dataset, shared by all tasks; not inside BIDS_DIR (required)
#   ATLAS         NAME=PATH of an atlas file, e.g. Schaefer100=/atlases/atlas-Schaefer100_dseg.nii.gz
#                 (its .tsv beside it), or LABEL[:desc-DESC] of an atlas in TEMPLATEFLOW_HOME
#                 (required)
#   FMRIPREP_DIR  fMRIPrep derivatives (default: $BIDS_DIR/derivatives/fmriprep)
#   IMAGE         the .sif image (default: $HOME/images/bids_fmristore.sif)
#   BIDS_FMRISTORE_CMD
#                 run this command instead of the image, split on spaces (e.g.
#                 "python -m bids_fmristore" or "/opt/venvs/bids_fmristore/bin/bids_fmristore"
#                 for a site install); IMAGE and apptainer are then not used
#   TEMPLATEFLOW_HOME
#                 local TemplateFlow cache, bound read-only into the image when set (nothing
#                 is ever downloaded: fetch the atlases on a login node beforehand)
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
read -r -a COMMAND <<< "${BIDS_FMRISTORE_CMD:-}"

if (( ${#COMMAND[@]} == 0 )); then
    # Apptainer, or its predecessor Singularity on older clusters.
    CONTAINER=$(command -v apptainer || command -v singularity) || {
        echo "neither apptainer nor singularity is on PATH (or set BIDS_FMRISTORE_CMD)" >&2
        exit 2
    }
fi

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
BINDS=(-B "${BIDS_DIR}:${BIDS_DIR}:ro" -B "${FMRIPREP_DIR}:${FMRIPREP_DIR}:ro"
       -B "${OUTPUT_DIR}:${OUTPUT_DIR}")
if [[ "${ATLAS}" == *=* ]]; then
    ATLAS_PATH=$(readlink -f "${ATLAS#*=}")
    ATLAS="${ATLAS%%=*}=${ATLAS_PATH}"
    ATLAS_DIR=$(dirname "${ATLAS_PATH}")
    BINDS+=(-B "${ATLAS_DIR}:${ATLAS_DIR}:ro")
fi
if [[ -n "${TEMPLATEFLOW_HOME:-}" ]]; then
    TEMPLATEFLOW_HOME=$(readlink -f "${TEMPLATEFLOW_HOME}")
    export TEMPLATEFLOW_HOME
    # --cleanenv drops host variables; APPTAINERENV_/SINGULARITYENV_ ones still reach the image.
    export APPTAINERENV_TEMPLATEFLOW_HOME=${TEMPLATEFLOW_HOME}
    export SINGULARITYENV_TEMPLATEFLOW_HOME=${TEMPLATEFLOW_HOME}
    BINDS+=(-B "${TEMPLATEFLOW_HOME}:${TEMPLATEFLOW_HOME}:ro")
fi
# Per-task work dir on node-local disk (pybids database); removed when the task ends.
WORK_DIR=$(mktemp -d "${SCRATCH_DIR}/bids_fmristore.${SLURM_ARRAY_JOB_ID:-job}.${SLURM_ARRAY_TASK_ID}.XXXXXX")
trap 'rm -rf "${WORK_DIR}"' EXIT
BINDS+=(-B "${WORK_DIR}:${WORK_DIR}")

ARGS=("${BIDS_DIR}" "${OUTPUT_DIR}" participant
      --participant-label "${PARTICIPANT}"
      -d "fmriprep=${FMRIPREP_DIR}"
      --atlas "${ATLAS}"
      --nprocs "${SLURM_CPUS_PER_TASK:-1}"
      -w "${WORK_DIR}"
      ${EXTRA[@]+"${EXTRA[@]}"})

echo "task ${SLURM_ARRAY_TASK_ID}: ${PARTICIPANT} on $(hostname)"
# The task exits with bids_fmristore's exit code (set -e); no exec, so the trap still runs.
if (( ${#COMMAND[@]} > 0 )); then
    "${COMMAND[@]}" "${ARGS[@]}"
else
    # Host paths are bound at the same paths inside the container, so the paths recorded in
    # OUTPUT_DIR/dataset_description.json (DatasetLinks, SourceDatasets) are valid on the host.
    # --cleanenv keeps the host's PYTHONPATH and the like out of the container.
    "${CONTAINER}" run --cleanenv "${BINDS[@]}" "${IMAGE}" "${ARGS[@]}"
fi

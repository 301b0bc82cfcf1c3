# bids_fmristore BIDS-App image, rebuildable later with the same contents: an exact base image
# tag and every Python package at the version of constraints.txt (the versions CI tests).
#
#   docker build --build-arg BIDS_FMRISTORE_CONTAINER_TAG=bids_fmristore:0.1.0 \
#       -t bids_fmristore:0.1.0 .
#   docker run --rm -u "$(id -u):$(id -g)" -v /data/bids:/bids:ro -v /data/out:/out \
#       -v "$HOME/.cache/templateflow:/templateflow:ro" \
#       bids_fmristore:0.1.0 /bids /out participant --atlas NAME=/bids/... [options]
#
# The test suite of the installed package is in the image (/opt/bids_fmristore/src):
#   docker run --rm -w /opt/bids_fmristore/src --entrypoint python bids_fmristore:0.1.0 \
#       -m pytest -p no:cacheprovider -k "not slurm"
# and, with the SLURM test (root, slurm-wlm and munge added), the `test` stage:
#   docker build --target test -t bids_fmristore:test . && docker run --rm bids_fmristore:test
#
# The tag is recorded in OUTPUT_DIR/dataset_description.json (GeneratedBy.Container).
# BuildKit (Docker's default builder) builds only the stages the target needs.
FROM python:3.11.7-slim-bookworm AS runtime

ARG BIDS_FMRISTORE_CONTAINER_TAG=""
ARG VCS_REF=""
ARG BUILD_DATE=""
LABEL org.opencontainers.image.title="bids_fmristore" \
      org.opencontainers.image.description="BIDS-App: parcellate fMRIPrep BOLD runs into fmristore HDF5 files" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.source="https://github.com/bids-apps/bids_fmristore" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.7-slim-bookworm" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}"
# TEMPLATEFLOW_HOME: bind a local TemplateFlow cache there (read-only is enough); nothing is
# ever downloaded.
ENV BIDS_FMRISTORE_CONTAINER_TYPE=docker \
    BIDS_FMRISTORE_CONTAINER_TAG=${BIDS_FMRISTORE_CONTAINER_TAG} \
    TEMPLATEFLOW_HOME=/templateflow \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# The context is what .dockerignore lets through: sources, tests, recipes, constraints.txt.
WORKDIR /opt/bids_fmristore/src
COPY . .
# PIP_CONSTRAINT also pins the build backend in pip's isolated build environment (-c does
# not reach it). The package sources are removed afterwards: the tests kept here import the
# installed package.
RUN PIP_CONSTRAINT=/opt/bids_fmristore/src/constraints.txt \
        pip install --no-cache-dir -c constraints.txt ".[fast,test]" \
    && rm -rf bids_fmristore build ./*.egg-info \
    && mkdir /templateflow \
    && bids_fmristore --version

# Run as an unprivileged user; `docker run -u UID:GID` works too (nothing is written to HOME).
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin bidsapp
USER bidsapp
WORKDIR /home/bidsapp

ENTRYPOINT ["bids_fmristore"]
CMD ["--help"]


# The whole suite, including the SLURM test (it starts munged, slurmctld and slurmd as root).
FROM runtime AS test
USER root
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        slurm-wlm munge \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/bids_fmristore/src
ENTRYPOINT []
CMD ["python", "-m", "pytest", "-p", "no:cacheprovider"]


# Default target: the runtime image.
FROM runtime

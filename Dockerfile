# bids_fmristore BIDS-App image.
#
#   docker build --build-arg BIDS_FMRISTORE_CONTAINER_TAG=bids_fmristore:0.1.0 \
#       -t bids_fmristore:0.1.0 .
#   docker run --rm -u "$(id -u):$(id -g)" -v /data/bids:/bids:ro -v /data/out:/out \
#       bids_fmristore:0.1.0 /bids /out participant --atlas NAME=/bids/... [options]
#
# The tag is recorded in OUTPUT_DIR/dataset_description.json (GeneratedBy.Container).
FROM python:3.11-slim

ARG BIDS_FMRISTORE_CONTAINER_TAG=""
ENV BIDS_FMRISTORE_CONTAINER_TYPE=docker \
    BIDS_FMRISTORE_CONTAINER_TAG=${BIDS_FMRISTORE_CONTAINER_TAG} \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Only what the build needs (.dockerignore keeps the rest out of the context).
WORKDIR /tmp/src
COPY pyproject.toml README.md ./
COPY bids_fmristore ./bids_fmristore
RUN pip install --no-cache-dir ".[fast]" \
    && cd / && rm -rf /tmp/src \
    && bids_fmristore --version

# Run as an unprivileged user; `docker run -u UID:GID` works too (nothing is written to HOME).
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin bidsapp
USER bidsapp
WORKDIR /home/bidsapp

ENTRYPOINT ["bids_fmristore"]
CMD ["--help"]

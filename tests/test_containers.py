"""Container recipes and the SLURM example: syntax and the essentials (no container engine here)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "containers" / "slurm_participant_array.sh"


def _sections(text: str) -> dict[str, str]:
    """Singularity definition sections: ``{"post": body, ...}``."""
    parts = re.split(r"^%(\w+)[ \t]*$", text, flags=re.MULTILINE)
    return {name: body for name, body in zip(parts[1::2], parts[2::2], strict=True)}


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_slurm_script_parses():
    subprocess.run(["bash", "-n", str(SLURM)], check=True, capture_output=True)


def test_slurm_script_essentials():
    text = SLURM.read_text()
    assert text.startswith("#!/bin/bash")
    assert "participants.tsv" in text and "SLURM_ARRAY_TASK_ID + 1" in text
    for flag in ("--participant-label", '--nprocs "${SLURM_CPUS_PER_TASK', "-w "):
        assert flag in text
    assert re.search(r"^#SBATCH --cpus-per-task=\d+", text, flags=re.MULTILINE)


def test_dockerfile():
    lines = [ln.strip() for ln in (ROOT / "Dockerfile").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    entry = [ln for ln in lines if ln.startswith("ENTRYPOINT")]
    assert len(entry) == 1 and json.loads(entry[0].split(None, 1)[1]) == ["bids_fmristore"]
    text = "\n".join(lines)
    assert 'pip install --no-cache-dir ".[fast]"' in text
    assert "BIDS_FMRISTORE_CONTAINER_TYPE=docker" in text
    assert "ARG BIDS_FMRISTORE_CONTAINER_TAG" in text
    user = [ln for ln in lines if ln.startswith("USER ")]
    assert user and user[-1] not in ("USER root", "USER 0")
    copied = [ln.split()[1:-1] for ln in lines if ln.startswith("COPY ")]
    sources = {src for srcs in copied for src in srcs}
    assert {"pyproject.toml", "README.md", "bids_fmristore"} <= sources
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert {"!pyproject.toml", "!README.md", "!bids_fmristore/"} <= set(ignore)


def test_singularity_definition():
    text = (ROOT / "Singularity.def").read_text()
    header = [ln for ln in text.splitlines() if ln and not ln.startswith("#")][:2]
    assert header == ["Bootstrap: docker", "From: python:3.11-slim"]
    sections = _sections(text)
    assert sections["runscript"].strip() == 'exec bids_fmristore "$@"'
    assert 'pip install --no-cache-dir ".[fast]"' in sections["post"]
    assert "export BIDS_FMRISTORE_CONTAINER_TYPE=singularity" in sections["environment"]
    copied = {ln.split()[0] for ln in sections["files"].splitlines() if ln.strip()}
    assert copied == {"pyproject.toml", "README.md", "bids_fmristore"}

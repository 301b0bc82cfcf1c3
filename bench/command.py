"""The whole command on a 4-run subject, as users run it (used by ``bench/run.py``).

    python bench/run.py --modes floor4 cli-means cli-full --cases f32-T300-L400

``floor4`` decompresses the 4 runs one after the other with isal (the bare floor of the same
bytes); ``cli-means`` runs ``python -m bids_fmristore BIDS OUT participant --store summary``
and ``cli-full`` the same with ``--store both``, each in its own process, timed from outside
(interpreter start-up, imports, pybids, atlas, writing and sidecars included; voxel maps on, as
by default). The 4 runs are hard links of the benchmark BOLD under fMRIPrep names, each with its
brain mask.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

N_RUNS = 4
SPACE = "MNI152NLin2009cAsym"


def make_dataset(bold: Path, atlas: Path, mask: Path, root: Path) -> dict[str, Path]:
    """Raw skeleton + fMRIPrep derivatives with ``N_RUNS`` hard links of ``bold``."""
    raw, prep = root / "bids", root / "fmriprep"
    if not (prep / "sub-01").exists():
        import nibabel as nib
        import numpy as np

        for folder, kind in ((raw, "raw"), (prep, "derivative")):
            (folder / "sub-01" / "func").mkdir(parents=True, exist_ok=True)
            (folder / "dataset_description.json").write_text(json.dumps(
                {"Name": "bench", "BIDSVersion": "1.10.0", "DatasetType": kind,
                 **({"GeneratedBy": [{"Name": "fMRIPrep"}]} if kind == "derivative" else {})}))
        (raw / "participants.tsv").write_text("participant_id\nsub-01\n")
        tiny = nib.Nifti1Image(np.zeros((2, 2, 2, 3), np.int16), np.eye(4))
        for run in range(1, N_RUNS + 1):
            stem = f"sub-01_task-rest_run-{run:02d}"
            nib.save(tiny, raw / "sub-01" / "func" / f"{stem}_bold.nii.gz")
            (raw / "sub-01" / "func" / f"{stem}_bold.json").write_text(
                json.dumps({"RepetitionTime": 2.0, "TaskName": "rest"}))
            base = prep / "sub-01" / "func" / f"{stem}_space-{SPACE}"
            os.link(bold, f"{base}_desc-preproc_bold.nii.gz")
            shutil.copy(mask, f"{base}_desc-brain_mask.nii.gz")
            Path(f"{base}_desc-preproc_bold.json").write_text(
                json.dumps({"RepetitionTime": 2.0, "TaskName": "rest"}))
    return {"bids": raw, "fmriprep": prep, "atlas": atlas}


def floor(bold: Path) -> None:
    """Decompress the run ``N_RUNS`` times (the same bytes the command reads)."""
    from isal import igzip

    buf = bytearray(4 << 20)
    for _ in range(N_RUNS):
        with igzip.open(bold, "rb") as f:
            while f.readinto(buf):
                pass


def run_command(ds: dict[str, Path], out: Path, store: str) -> dict:
    """Wall time and peak RSS (MB) of the whole command in a fresh process."""
    if out.exists():
        shutil.rmtree(out)
    argv = [sys.executable, "-m", "bids_fmristore", str(ds["bids"]), str(out), "participant",
            "-d", f"fmriprep={ds['fmriprep']}", "--atlas", f"Bench={ds['atlas']}",
            "--store", store, "-q"]
    t0 = time.perf_counter()
    before = os.wait4  # the child's own peak RSS, not this process's
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = before(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode()
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"bids_fmristore failed:\n{err}")
    return {"wall": wall, "peak_mb": usage.ru_maxrss / 1024}

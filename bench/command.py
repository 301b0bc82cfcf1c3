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
#: bench/run.py's whole-command modes: --store value and further options
CLI_MODES = {
    "cli-means": ("summary", ()),
    "cli-full": ("both", ()),
    "cli-dense": ("summary", ("--dense",)),
    "cli-full-denoise": ("both", ("--denoise", "simple")),
}


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
    func = prep / "sub-01" / "func"
    tables = [func / f"sub-01_task-rest_run-{run:02d}_desc-confounds_timeseries.tsv"
              for run in range(1, N_RUNS + 1)]  # --denoise: fMRIPrep's confounds beside runs
    if not all(tsv.exists() for tsv in tables):
        n_t = _n_volumes(bold)
        for tsv in tables:
            write_confounds(tsv, n_t)
    return {"bids": raw, "fmriprep": prep, "atlas": atlas}


def _n_volumes(bold: Path) -> int:
    import nibabel as nib

    return nib.load(bold).shape[3]


def write_confounds(tsv: Path, n_t: int) -> None:
    """The columns nilearn's ``simple`` strategy takes, as fMRIPrep names them."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(n_t)
    cols = {}
    for base in ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z", "white_matter",
                 "csf", "global_signal"):
        series = np.cumsum(rng.normal(0, 0.01, n_t))
        cols[base] = series
        cols[f"{base}_derivative1"] = np.r_[np.nan, np.diff(series)]
        cols[f"{base}_power2"] = series ** 2
        cols[f"{base}_derivative1_power2"] = cols[f"{base}_derivative1"] ** 2
    for k in range(max(1, n_t // 60)):
        cols[f"cosine{k:02d}"] = np.cos(np.pi * (k + 1) * (np.arange(n_t) + 0.5) / n_t)
    cols["framewise_displacement"] = np.r_[np.nan, np.abs(rng.normal(0.1, 0.05, n_t - 1))]
    cols["std_dvars"] = np.r_[np.nan, np.abs(rng.normal(1, 0.2, n_t - 1))]
    pd.DataFrame(cols).to_csv(tsv, sep="\t", index=False, na_rep="n/a")
    tsv.with_suffix(".json").write_text("{}\n")


def floor(bold: Path) -> None:
    """Decompress the run ``N_RUNS`` times (the same bytes the command reads)."""
    from isal import igzip

    buf = bytearray(4 << 20)
    for _ in range(N_RUNS):
        with igzip.open(bold, "rb") as f:
            while f.readinto(buf):
                pass


def compile_package() -> str:
    """Compile bids_fmristore's bytecode now, before anything is timed, as ``pip install``
    does for an installed package; returns a line saying so.

    Where ``PYTHONDONTWRITEBYTECODE`` is set (as in some CI and container images) an editable
    checkout is otherwise compiled anew by every command it starts: 0.1-0.2 s more start-up
    per command measured here (our modules' own import time 0.17 s instead of 0.034), which
    the users of an installed package do not pay."""
    import compileall

    import bids_fmristore

    folder = Path(bids_fmristore.__file__).parent
    compileall.compile_dir(folder, quiet=1)
    return f"bytecode of {folder} compiled (as pip install does)"


def run_command(ds: dict[str, Path], out: Path, store: str, extra: tuple = ()) -> dict:
    """Wall time, CPU time (user + system, all threads) and peak RSS (MB) of the whole command
    in a fresh process."""
    if out.exists():
        shutil.rmtree(out)
    os.sync()  # no earlier command's writeback during this one (see run.remove_outputs)
    argv = [sys.executable, "-m", "bids_fmristore", str(ds["bids"]), str(out), "participant",
            "-d", f"fmriprep={ds['fmriprep']}", "--atlas", f"Bench={ds['atlas']}",
            "--store", store, *extra, "-q"]
    t0 = time.perf_counter()
    before = os.wait4  # the child's own peak RSS, not this process's
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = before(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode()
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"bids_fmristore failed:\n{err}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime,
            "peak_mb": usage.ru_maxrss / 1024}

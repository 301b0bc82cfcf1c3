"""Start-up benchmark: one participant job, and the group level, against the dataset's size.

    python bench/startup.py                        # 100, 1,000, 10,000 subjects; group 100, 1,000
    python bench/startup.py --quick                # 30 and 300 subjects; group 30, 300
    python bench/startup.py --sizes 100 1000 --group-sizes 100 1000 --rounds 3
    python bench/startup.py --database 100 1000    # also with a --bids-database-dir built once

Data: fMRIPrep-shaped stub datasets, one per size (0-byte files named as fMRIPrep names
them, 44 per subject: anat, func, masks, confounds, transforms, surfaces, report; and 3 raw
BIDS files per subject with ``participants.tsv``), generated under ``--workdir`` (default: a
new folder in /tmp, removed at the end unless ``--keep``). Subject
``00001`` is real: the first run of ``bids_fmristore.example``'s sub-01 (nibabel's test BOLD,
its brain mask, confounds and sidecar) with the example's Demo atlas.

Each participant job is ``bids_fmristore BIDS OUT participant --participant-label 00001 -d
fmriprep=DERIV --atlas Demo=ATLAS`` in its own process with a fresh OUTPUT_DIR; wall is the
process's, start to exit (imports included), peak RSS is its ``VmHWM``. Rounds alternate
between the sizes (so that a change of load on the machine hits them alike); the table shows
the median wall and the largest peak RSS. ``--database N ...`` adds, at those sizes, the
same job with ``--bids-database-dir`` on an index of all subjects built once beforehand (as
``--index-only`` builds it; its build time and peak RSS are printed).

The group level runs ``bids_fmristore BIDS OUT group`` on an OUTPUT_DIR holding N subjects'
voxel maps (``*_desc-voxelstats_bold.h5``, one run each, on a 20x24x20 grid).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPACE = "MNI152NLin2009cAsym"
REAL = "00001"
GROUP_SHAPE = (20, 24, 20)

#: an fMRIPrep subject's files, relative to its folder (``{s}`` is ``sub-<label>``)
_ANAT = [
    "desc-preproc_T1w.nii.gz", "desc-preproc_T1w.json", "desc-brain_mask.nii.gz",
    "desc-brain_mask.json", "dseg.nii.gz", "label-CSF_probseg.nii.gz",
    "label-GM_probseg.nii.gz", "label-WM_probseg.nii.gz",
    f"space-{SPACE}_desc-preproc_T1w.nii.gz", f"space-{SPACE}_desc-preproc_T1w.json",
    f"space-{SPACE}_desc-brain_mask.nii.gz", f"space-{SPACE}_desc-brain_mask.json",
    f"space-{SPACE}_dseg.nii.gz", f"space-{SPACE}_label-CSF_probseg.nii.gz",
    f"space-{SPACE}_label-GM_probseg.nii.gz", f"space-{SPACE}_label-WM_probseg.nii.gz",
    f"from-{SPACE}_to-T1w_mode-image_xfm.h5", f"from-T1w_to-{SPACE}_mode-image_xfm.h5",
    "from-T1w_to-fsnative_mode-image_xfm.txt", "from-fsnative_to-T1w_mode-image_xfm.txt",
    *(f"hemi-{h}_{surf}.surf.gii" for h in "LR"
      for surf in ("white", "pial", "midthickness", "inflated", "desc-reg_sphere")),
]
_RUN = "task-rest_run-01"
_FUNC = [
    f"{_RUN}_desc-confounds_timeseries.tsv", f"{_RUN}_desc-confounds_timeseries.json",
    f"{_RUN}_desc-coreg_boldref.nii.gz", f"{_RUN}_desc-hmc_boldref.nii.gz",
    f"{_RUN}_from-boldref_to-T1w_mode-image_desc-coreg_xfm.txt",
    f"{_RUN}_from-orig_to-boldref_mode-image_desc-hmc_xfm.txt",
    f"{_RUN}_space-{SPACE}_boldref.nii.gz",
    f"{_RUN}_space-{SPACE}_desc-brain_mask.nii.gz", f"{_RUN}_space-{SPACE}_desc-brain_mask.json",
    f"{_RUN}_space-{SPACE}_desc-preproc_bold.nii.gz",
    f"{_RUN}_space-{SPACE}_desc-preproc_bold.json",
    f"{_RUN}_space-T1w_desc-preproc_bold.nii.gz", f"{_RUN}_space-T1w_desc-preproc_bold.json",
]
FILES_PER_SUBJECT = len(_ANAT) + len(_FUNC) + 1  # + the report sub-<label>.html at the root
assert FILES_PER_SUBJECT == 44


def label(i: int) -> str:
    return f"{i:05d}"


class StubDataset:
    """Raw BIDS + fMRIPrep-shaped derivatives that grow to a number of subjects."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bids = root / "bids"
        self.fmriprep = root / "fmriprep"
        self.n = 0
        self.atlas: Path | None = None

    def _descriptions(self) -> None:
        for path, content in ((self.bids, {"Name": "stub", "BIDSVersion": "1.10.0",
                                           "DatasetType": "raw"}),
                              (self.fmriprep, {"Name": "fMRIPrep stub", "BIDSVersion": "1.10.0",
                                               "DatasetType": "derivative",
                                               "GeneratedBy": [{"Name": "fMRIPrep"}]})):
            path.mkdir(parents=True, exist_ok=True)
            (path / "dataset_description.json").write_text(json.dumps(content))
        (self.bids / "task-rest_bold.json").write_text(json.dumps({"RepetitionTime": 2.0,
                                                                   "TaskName": "rest"}))

    def _stub_subject(self, sub: str) -> None:
        s = f"sub-{sub}"
        folders = {"anat": self.fmriprep / s / "anat", "func": self.fmriprep / s / "func"}
        for folder in (*folders.values(), self.bids / s / "anat", self.bids / s / "func"):
            folder.mkdir(parents=True, exist_ok=True)
        names = [folders["anat"] / f"{s}_{n}" for n in _ANAT]
        names += [folders["func"] / f"{s}_{n}" for n in _FUNC]
        names += [self.fmriprep / f"{s}.html",
                  self.bids / s / "anat" / f"{s}_T1w.nii.gz",
                  self.bids / s / "func" / f"{s}_{_RUN}_bold.nii.gz",
                  self.bids / s / "func" / f"{s}_{_RUN}_bold.json"]
        for path in names:
            path.touch()

    def _real_subject(self) -> None:
        from bids_fmristore.example import build_example

        example = build_example(self.root / "example")
        src = example.fmriprep / "sub-01" / "func"
        dst = self.fmriprep / f"sub-{REAL}" / "func"
        stem = "task-rest_run-01"
        for name in (f"{stem}_space-{SPACE}_desc-preproc_bold.nii.gz",
                     f"{stem}_space-{SPACE}_desc-preproc_bold.json",
                     f"{stem}_space-{SPACE}_desc-brain_mask.nii.gz",
                     f"{stem}_desc-confounds_timeseries.tsv"):
            shutil.copyfile(src / f"sub-01_{name}", dst / f"sub-{REAL}_{name}")
        self.atlas = example.atlas

    def grow(self, n: int) -> float:
        """Add subjects up to ``n``; return the seconds it took."""
        started = time.perf_counter()
        if self.n == 0:
            self._descriptions()
        for i in range(self.n + 1, n + 1):
            self._stub_subject(label(i))
        if self.n == 0:
            self._real_subject()
        self.n = max(self.n, n)
        rows = "".join(f"sub-{label(i)}\t{20 + i % 50}\t{'MF'[i % 2]}\n"
                       for i in range(1, self.n + 1))
        (self.bids / "participants.tsv").write_text("participant_id\tage\tsex\n" + rows)
        return time.perf_counter() - started


# -- measuring a command in its own process ---------------------------------------------------
_WRAPPER = """
import atexit, json, sys
def _report():
    with open(sys.argv[1], "w") as f:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                json.dump({"rss_mb": int(line.split()[1]) / 1024}, f)
atexit.register(_report)
from bids_fmristore.cli.run import main
sys.exit(main(sys.argv[2:]))
"""


def measure(argv: list[str], workdir: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of ``bids_fmristore argv`` in a new process."""
    report = Path(tempfile.mktemp(dir=workdir, suffix=".json"))
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, str(report), *argv],
                          capture_output=True, text=True, cwd=HERE.parent)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"bids_fmristore {' '.join(argv)} failed (exit {proc.returncode}):\n"
                         f"{proc.stderr[-3000:]}")
    rss = json.loads(report.read_text())["rss_mb"]
    report.unlink()
    return wall, rss


def participant_argv(ds: StubDataset, out: Path, database: Path | None) -> list[str]:
    argv = [str(ds.bids), str(out), "participant", "--participant-label", REAL,
            "-d", f"fmriprep={ds.fmriprep}", "--atlas", f"Demo={ds.atlas}", "--nprocs", "1"]
    return argv + (["--bids-database-dir", str(database)] if database is not None else [])


# -- group level ------------------------------------------------------------------------------
def group_outputs(out: Path, n: int, bids: Path) -> None:
    """OUTPUT_DIR with ``n`` subjects' voxel maps (one run each), as the participant level
    writes them."""
    import numpy as np

    from bids_fmristore.derivatives import write_sidecar
    from bids_fmristore.formats.header import Geometry
    from bids_fmristore.voxelmaps import STATS, MapsTarget, write_maps

    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    affine[:3, 3] = [-40.0, -48.0, -40.0]
    grid = np.indices(GROUP_SHAPE)
    centre = (np.array(GROUP_SHAPE) - 1)[:, None, None, None] / 2
    radius = np.sqrt((((grid - centre) / centre) ** 2).sum(axis=0))
    for i in range(1, n + 1):
        rng = np.random.default_rng(i)
        mask = radius < 0.9 + 0.05 * rng.standard_normal()
        voxels = np.flatnonzero(mask.ravel(order="F"))
        sub = f"sub-{label(i)}"
        path = out / sub / "func" / f"{sub}_space-{SPACE}_desc-voxelstats_bold.h5"
        path.parent.mkdir(parents=True, exist_ok=True)
        target = MapsTarget(path, Geometry(GROUP_SHAPE, affine), mask, voxels,
                            (np.ones(voxels.size, bool),))
        mean = 100 + rng.standard_normal(voxels.size)
        std = 1 + rng.random(voxels.size)
        stats = {"mean": mean, "std": std, "tsnr": mean / std}
        labels = write_maps(target, sub, [(f"{sub}_{_RUN}", stats)])
        # the sidecar after the file, as the participant level writes it: it marks it done
        write_sidecar(path, {
            "Labels": labels, "Statistics": list(STATS), "FailedRuns": [],
            "Inputs": {"Files": {}, "Options": {}}})
    from bids_fmristore.derivatives import write_dataset_description
    from bids_fmristore.inputs.discovery import Dataset

    write_dataset_description(out, [Dataset("raw", bids, False)])


# -- main ----------------------------------------------------------------------------------
def _table(title: str, rows: list[tuple], base: int) -> str:
    lines = [title, "| subjects | wall (s) | peak RSS (MB) | wall / wall at "
             f"{base:,} | RSS / RSS at {base:,} |", "| ---: | ---: | ---: | ---: | ---: |"]
    ref = {n: (w, r) for n, w, r in rows}.get(base)
    for n, wall, rss in rows:
        rw = f"{wall / ref[0]:.2f}" if ref else "-"
        rr = f"{rss / ref[1]:.2f}" if ref else "-"
        lines.append(f"| {n:,} | {wall:.2f} | {rss:.0f} | {rw} | {rr} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--group-sizes", type=int, nargs="*", default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="sizes 30 300, 2 rounds")
    parser.add_argument("--database", type=int, nargs="*", default=[], metavar="N",
                        help="sizes at which to also time the job with a --bids-database-dir "
                        "built once")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the generated datasets")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.sizes, opts.group_sizes, opts.rounds = [30, 300], [30, 300], 2
    sizes = sorted(set(opts.sizes))
    workdir = Path(tempfile.mkdtemp(prefix="bids_fmristore-startup-", dir=opts.workdir))
    print(f"data in {workdir}; {FILES_PER_SUBJECT} files per subject in the fMRIPrep dataset, "
          f"{opts.rounds} round(s)", flush=True)
    sys.path.insert(0, str(HERE))
    import command  # bench/command.py, beside this file

    print(command.compile_package(), flush=True)
    try:
        datasets = {}
        for n in sizes:  # one dataset per size, so that rounds can alternate between them
            datasets[n] = StubDataset(workdir / f"data-{n}")
            took = datasets[n].grow(n)
            print(f"  {n:,} subjects generated ({took:.0f} s)", flush=True)
        databases = {}
        for n in sizes:
            if n in opts.database:
                ds, databases[n] = datasets[n], workdir / f"db-{n}"
                took, rss = measure([str(ds.bids), str(workdir / "db-out"), "participant", "-d",
                                     f"fmriprep={ds.fmriprep}", "--bids-database-dir",
                                     str(databases[n]), "--index-only"], workdir)
                print(f"  {n:,} subjects: --bids-database-dir built in {took:.1f} s, "
                      f"{rss:.0f} MB", flush=True)
        times: dict[tuple, list[tuple[float, float]]] = {}
        for r in range(opts.rounds):
            for n in sizes:
                for db in (None, databases.get(n)) if n in databases else (None,):
                    out = workdir / f"out-{n}-{r}-{'db' if db else 'no'}"
                    times.setdefault((n, db is not None), []).append(
                        measure(participant_argv(datasets[n], out, db), workdir))
                    shutil.rmtree(out)
            print(f"  round {r + 1}: " + ", ".join(
                f"{n:,}{' (db)' if d else ''} {t[-1][0]:.2f} s" for (n, d), t in times.items()),
                flush=True)
        rows, db_rows = [], []
        for (n, with_db), found in times.items():
            (db_rows if with_db else rows).append(
                (n, statistics.median(w for w, _ in found), max(m for _, m in found)))
        ds = datasets[sizes[-1]]
        group_rows = []
        for n in sorted(set(opts.group_sizes)):
            out = workdir / f"group-{n}"
            group_outputs(out, n, ds.bids if ds.n else workdir)
            walls, rsss = [], []
            for _ in range(opts.rounds):
                wall, rss = measure([str(ds.bids), str(out), "group", "--overwrite"], workdir)
                walls.append(wall)
                rsss.append(rss)
            group_rows.append((n, statistics.median(walls), max(rsss)))
            print(f"  group over {n:,} subjects: {group_rows[-1][1]:.2f} s, "
                  f"{group_rows[-1][2]:.0f} MB", flush=True)
            shutil.rmtree(out)
        print()
        print(_table("participant job (--participant-label 00001, one run, one atlas)",
                     rows, sizes[0]))
        if db_rows:
            print()
            print(_table("the same with --bids-database-dir (index of all subjects, built "
                         "beforehand)", db_rows, sizes[0]))
        if group_rows:
            print()
            print(_table(f"group level (voxel maps, {'x'.join(map(str, GROUP_SHAPE))} grid)",
                         group_rows, min(opts.group_sizes)))
    finally:
        if opts.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

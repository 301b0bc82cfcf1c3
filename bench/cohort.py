"""Group-level benchmark: our cohort CSV → LabeledVolumeSet vs ModelArrayIO's voxel conversion.

    python bench/cohort.py               # 200 subjects, 3 rounds
    python bench/cohort.py --quick       # 50 subjects, 2 rounds
    python bench/cohort.py --subjects 100 --rounds 5 --modes ours modelarrayio

Data: N synthetic subjects on the MNI 2 mm grid (97x115x97), each a float32 scalar map
(``.nii.gz``) and its own brain mask (the MNI brain shifted by up to one voxel), generated
deterministically into ``bench/_data/cohort`` (reused on later runs), plus the intersection
the voxels in at least half of the masks as the group mask that ModelArrayIO requires (so
that NaN outside a subject's own mask matters). Both tools read the same cohort CSV
(ModelArrayIO's long format) and write gzip level 4 + shuffle, float32. Modes, each measured in
its own process (median wall time from inside the process, module imports excluded; peak RSS
of that process from ``VmHWM``), rounds interleaved:

    ours       read_cohort + write_cohort_sets(group_mask=<the group mask>)
    ours-auto  read_cohort + write_cohort_sets(mask_threshold=0.5)   (same mask, computed)
    modelarrayio  ``modelarrayio to-modelarray --cohort-file CSV --mask <the group mask>``

ModelArrayIO (``pip install modelarrayio``) is optional: without it, only our modes run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from data import SHAPE, brain_mask, mni_affine  # noqa: E402
from run import peak_rss_mb  # noqa: E402

MODES = ("ours", "ours-auto", "modelarrayio")
SCALAR = "alff"


def has_modelarrayio() -> bool:
    try:
        import modelarrayio.cli.to_modelarray  # noqa: F401
    except ImportError:
        return False
    return True


# -- data -----------------------------------------------------------------------------------
def subject_files(data_dir: Path, s: int) -> tuple[Path, Path]:
    return data_dir / f"sub-{s:03d}_{SCALAR}.nii.gz", data_dir / f"sub-{s:03d}_mask.nii.gz"


def ensure_data(n_sub: int, data_dir: Path) -> tuple[Path, Path]:
    """Subjects 0..n_sub-1 (made once), the cohort CSV and the group mask of these subjects."""
    data_dir.mkdir(parents=True, exist_ok=True)
    group_path = data_dir / f"group_mask-N{n_sub}.nii.gz"
    files = [p for s in range(n_sub) for p in subject_files(data_dir, s)]
    if not group_path.exists() or not all(p.exists() for p in files):
        generate(n_sub, data_dir, group_path)
    cohort_csv = data_dir / f"cohort-N{n_sub}.csv"
    with cohort_csv.open("w", newline="") as f:  # absolute paths: ModelArrayIO reads from CWD
        w = csv.writer(f)
        w.writerow(["scalar_name", "source_file", "source_mask_file", "age", "sex"])
        for s in range(n_sub):
            src, msk = subject_files(data_dir, s)
            w.writerow([SCALAR, src, msk, 20 + s % 50, "MF"[s % 2]])
    return cohort_csv, group_path


def generate(n_sub: int, data_dir: Path, group_path: Path) -> None:
    """Write the missing subjects, then the group mask: voxels in at least half of the masks."""
    import nibabel as nib
    from isal import igzip

    hdr = nib.Nifti1Header()
    hdr.set_data_shape(SHAPE)
    hdr.set_qform(mni_affine(), 1)
    hdr.set_sform(mni_affine(), 4)
    hdr.set_xyzt_units("mm")
    hdr["vox_offset"] = 352
    brain = brain_mask()
    smooth = 1 + 0.5 * np.sin(np.indices(SHAPE).sum(0) / 7.0)
    count = np.zeros(SHAPE, np.int32)
    for s in range(n_sub):
        src, msk = subject_files(data_dir, s)
        rng = np.random.default_rng(1000 + s)
        shift = rng.integers(-1, 2, size=3)  # each subject's brain moved by up to one voxel
        mask = brain & np.roll(brain, tuple(shift), axis=(0, 1, 2))
        count += mask
        if src.exists() and msk.exists():
            continue
        if s % 25 == 0:
            print(f"  generating subjects {s}..{min(s + 25, n_sub) - 1}", flush=True)
        values = np.where(mask, smooth * (1 + 0.3 * rng.standard_normal(SHAPE)), 0)
        for path, data in ((msk, mask.astype(np.uint8)), (src, values.astype(np.float32))):
            hdr.set_data_dtype(data.dtype)
            tmp = path.with_name(path.name + ".tmp")
            with igzip.open(tmp, "wb", compresslevel=1) as f:
                f.write(hdr.binaryblock + b"\0" * 4)
                f.write(data.tobytes(order="F"))
            os.replace(tmp, path)
    group = count >= -(-n_sub // 2)
    nib.save(nib.Nifti1Image(group.astype(np.uint8), mni_affine()), group_path)


# -- measured work (run in a child process) --------------------------------------------------
def work(mode: str, cohort_csv: Path, group_mask: Path, out_dir: Path) -> None:
    if mode in ("ours", "ours-auto"):
        from bids_fmristore.group.cohort import read_cohort, write_cohort_sets

        cohort = read_cohort(cohort_csv)
        if mode == "ours":
            write_cohort_sets(cohort, out_dir, group_mask=group_mask, overwrite=True)
        else:
            write_cohort_sets(cohort, out_dir, mask_threshold=0.5, overwrite=True)
    else:
        from modelarrayio.cli.to_modelarray import to_modelarray

        to_modelarray(cohort_csv, output=out_dir / "modelarray.h5", group_mask_file=group_mask,
                      compression="gzip", compression_level=4, shuffle=True)


def child_main(args: list[str]) -> None:
    mode, cohort_csv, group_mask, out_dir = args
    import h5py  # noqa: F401
    import nibabel  # noqa: F401
    import pandas  # noqa: F401

    if mode.startswith("ours"):
        import bids_fmristore.group.cohort  # noqa: F401
    else:
        import logging

        import modelarrayio.cli.to_modelarray  # noqa: F401

        logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    work(mode, Path(cohort_csv), Path(group_mask), Path(out_dir))
    wall = time.perf_counter() - t0
    print(json.dumps({"wall": wall, "peak_mb": peak_rss_mb()}))


def measure(mode: str, cohort_csv: Path, group_mask: Path, out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
    proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(cohort_csv), str(group_mask),
         str(out_dir)], capture_output=True, text=True, env=env, check=False,
    )
    if proc.returncode:
        raise RuntimeError(f"{mode} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(out: Path, group_mask: Path, n_check: int = 5) -> str:
    """Do both outputs hold the same numbers? Checks ``n_check`` subjects voxel by voxel."""
    import h5py
    import nibabel as nib

    from bids_fmristore.formats.labeled import LabeledVolumeSet
    from bids_fmristore.group.cohort import output_paths

    group = np.asanyarray(nib.load(group_mask).dataobj) > 0
    ijk = np.nonzero(group)  # ModelArrayIO's voxel order (C order of i, j, k)
    with h5py.File(out / "modelarrayio" / "modelarray.h5", "r") as f, \
            LabeledVolumeSet(output_paths(out / "ours", SCALAR)["h5"]) as lv:
        theirs = f[f"scalars/{SCALAR}/values"]
        assert theirs.shape == (len(lv.labels), int(group.sum())), theirs.shape
        n_nan = 0
        for s in np.linspace(0, len(lv.labels) - 1, n_check).astype(int):
            ours = lv.volume(lv.labels[s])[ijk]
            np.testing.assert_array_equal(ours, theirs[s].astype(np.float32))  # NaN == NaN
            n_nan += int(np.isnan(ours).sum())
    return (f"outputs agree exactly for {n_check} subjects x {group.sum()} group-mask voxels "
            f"({n_nan} of these values NaN: outside the subject's own mask)")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subjects", type=int, default=200)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--data-dir", type=Path, default=HERE / "_data" / "cohort")
    a = p.parse_args()
    if a.quick:
        a.subjects, a.rounds = 50, 2
    if "modelarrayio" in a.modes and not has_modelarrayio():
        print("modelarrayio is not installed (pip install modelarrayio): timing ours only")
        a.modes = [m for m in a.modes if m != "modelarrayio"]
    print(f"cores: {os.cpu_count()}, python {sys.version.split()[0]}, "
          f"{a.subjects} subjects on {SHAPE}, {a.rounds} rounds")
    cohort_csv, group_mask = ensure_data(a.subjects, a.data_dir)
    results: dict[str, list[dict]] = {m: [] for m in a.modes}
    with tempfile.TemporaryDirectory(dir=a.data_dir.parent) as tmp:
        for _ in range(a.rounds):  # interleave modes so that drift hits all equally
            for mode in a.modes:
                out = Path(tmp) / ("ours" if mode.startswith("ours") else mode)
                results[mode].append(measure(mode, cohort_csv, group_mask, out))
        check = (compare(Path(tmp), group_mask)
                 if {"ours", "modelarrayio"} <= set(a.modes) else "")
    med = {m: statistics.median(r["wall"] for r in results[m]) for m in a.modes}
    peak = {m: max(r["peak_mb"] for r in results[m]) for m in a.modes}
    print(f"{'mode':14s} {'median s':>9s} {'peak MB':>8s}   rounds (s)")
    for m in a.modes:
        rounds = " ".join(f"{r['wall']:.2f}" for r in results[m])
        print(f"{m:14s} {med[m]:9.2f} {peak[m]:8.0f}   {rounds}")
    if "modelarrayio" in med:
        print("\nours / modelarrayio:")
        for m in (m for m in a.modes if m.startswith("ours")):
            print(f"  {m:12s} wall {med[m] / med['modelarrayio']:.2f}x   "
                  f"peak RSS {peak[m] / peak['modelarrayio']:.2f}x")
    if check:
        print(check)


if __name__ == "__main__":
    main()

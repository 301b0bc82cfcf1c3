"""Parcellation benchmark: our streaming engine vs nilearn vs the bare gzip decompression floor.

    python bench/run.py                 # all cases, 3 rounds each
    python bench/run.py --quick         # float32 T=300 with 400 labels only, 2 rounds
    python bench/run.py --cases f32-T300-L400 i16-T300-L400 --rounds 5

Data are generated deterministically on the MNI 2 mm grid (97x115x97, brain mask from
nilearn's shipped MNI template) into ``bench/_data`` (reused on later runs). Every measurement
runs in its own process; the table reports the median wall time (measured inside the process;
module imports excluded, reading the atlas and mask included), the peak RSS of that process
(VmHWM), and ratios taken from the same run:

    (a) floor  bare isal decompression of the .nii.gz
    (b) means  our parcel means only
    (c) h5     our full + summary H5ParcellatedMultiScan output
    (d) nilearn NiftiLabelsMasker(resampling_target="data").fit_transform
    (e) denoise our means + fMRIPrep confounds (nilearn's "simple" strategy) + cleaning, as
                --denoise simple does (synthetic confounds with fMRIPrep's column names)
    (f) h5-denoise (c), then its denoised companion with voxel series, as --denoise simple
                --store both does: the run's in-mask series staged in a scratch file during
                the pass, then cleaned band by band (a few clusters at a time)
    (g) dense  our means + the run as an H5NeuroVec from the same pass, as --dense does
    (h) latent our means + the run's PCA as a LatentNeuroVec (K = LATENT_K components), as
                --latent does: in-mask values kept in a scratch file during the pass, then
                the Gram matrix and the loadings in two passes over it
    (i) floor4  bare isal decompression of the same BOLD 4 times
    (j) cli-means  the whole command (``python -m bids_fmristore ... participant --store
                summary``) on one subject with 4 such runs, timed from outside its process
    (k) cli-full   the same with ``--store both`` (see bench/command.py)
    (n) cli-dense  (j) with ``--dense``: each run also as an H5NeuroVec
    (o) cli-full-denoise  (k) with ``--denoise simple``: the denoised companion with voxel
                series (confounds tables beside the runs)
    (l) participant     the whole participant level (pybids indexing included) of one subject
                        with 2 runs of the case, --no-report
    (m) participant-report  the same with the HTML report (the report's imports included)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import command  # noqa: E402  (bench/command.py, beside this file)
from data import CASES, ensure_data, fmriprep_named, participant_dataset  # noqa: E402

HERE = Path(__file__).resolve().parent
MODES = ("floor", "means", "h5", "nilearn", "denoise", "h5-denoise", "dense", "latent",
         "floor4", "cli-means", "cli-full", "cli-dense", "cli-full-denoise", "participant",
         "participant-report")
#: components of the latent case
LATENT_K = 20
#: (label, numerator, denominator) of the ratios printed, letters as in the docstring
RATIOS = (("b/a", "means", "floor"), ("c/a", "h5", "floor"), ("d/b", "nilearn", "means"),
          ("e/b", "denoise", "means"), ("f/c", "h5-denoise", "h5"), ("g/a", "dense", "floor"),
          ("h/a", "latent", "floor"), ("j/i", "cli-means", "floor4"),
          ("k/i", "cli-full", "floor4"), ("m/l", "participant-report", "participant"))
#: (label, minuend, subtrahend, unit): what an option adds to the whole command, in floors
ADDED = (("(f-c)/a", "h5-denoise", "h5", "floor"), ("(g-b)/a", "dense", "means", "floor"),
         ("(n-j)/i", "cli-dense", "cli-means", "floor4"),
         ("(o-k)/i", "cli-full-denoise", "cli-full", "floor4"))


def remove_outputs(out_dir: Path) -> None:
    """Remove an earlier round's outputs and write back what is dirty, before the clock
    starts: renaming a new file over an old one makes ext4 write the new file's data out at
    once (auto_da_alloc), and freeing an old file's 200 MB took 0.15 s; a new output costs
    neither."""
    for name in ("b.h5", "d.h5", "l.lv.h5"):
        (out_dir / name).unlink(missing_ok=True)
    # An earlier mode's dirty pages (1.5 GB for a dense run of 1000 volumes) would otherwise
    # be written back while this one runs: f32-T1000 dense took 14.2 s that way, 10.2-10.4 s
    # after a sync.
    os.sync()


def work(mode: str, bold: Path, atlas: Path, mask: Path, out_dir: Path) -> None:
    if mode == "floor4":
        command.floor(bold)
    elif mode in ("participant", "participant-report"):
        import shutil

        from bids_fmristore.cli.run import main as cli

        root = participant_dataset(bold, atlas, mask)
        out = out_dir / mode
        shutil.rmtree(out, ignore_errors=True)
        argv = [str(root), str(out), "participant", "-q", "--skip-bids-validation",
                "-d", f"fmriprep={root / 'derivatives' / 'fmriprep'}", "--atlas",
                f"Bench={atlas}", "-w", str(out_dir / f"work-{mode}")]
        code = cli(argv + (["--no-report"] if mode == "participant" else []))
        if code:
            raise RuntimeError(f"participant level exited {code}")
    elif mode == "floor":
        from isal import igzip

        buf = bytearray(4 << 20)  # the fastest read size for isal here (see inputs/gzip_reader.py)
        with igzip.open(bold, "rb") as f:
            while f.readinto(buf):
                pass
    elif mode in ("means", "h5", "denoise", "h5-denoise", "dense", "latent"):
        import nibabel as nib

        from bids_fmristore.atlas import load_atlas
        from bids_fmristore.compute.parcellate import Parcels, parcellate_run
        from bids_fmristore.formats.header import Geometry, mask_order
        from bids_fmristore.formats.multiscan import ClusterLayout
        from bids_fmristore.formats.multiscan_writer import MultiScanWriter
        from bids_fmristore.inputs.nifti_header import read_info

        info = read_info(bold)
        labels = load_atlas("B", atlas).labels
        brain = np.asanyarray(nib.load(mask).dataobj) > 0
        file_mask = brain & (labels > 0)
        vox = mask_order(file_mask)
        cmap = labels.ravel(order="F")[vox]
        parcels = Parcels(vox, cmap)
        if mode == "means":
            parcellate_run(info, [parcels])
            return
        if mode in ("dense", "latent"):
            _dense_or_latent(mode, info, bold, mask, brain, parcels, out_dir)
            return
        if mode == "denoise":
            from bids_fmristore.compute.denoise import CleanOptions, clean_signals
            from bids_fmristore.inputs.confounds import ConfoundsSpec, load_run_confounds

            (means,) = parcellate_run(info, [parcels])
            confounds = load_run_confounds(fmriprep_named(bold), ConfoundsSpec("simple"),
                                           info.shape[3])
            clean_signals(means, confounds.table, confounds.sample_mask, CleanOptions(t_r=2.0))
            return
        layout = ClusterLayout(file_mask, cmap)
        geom = Geometry(info.shape[:3], info.affine)
        stage = None
        if mode == "h5-denoise":  # the run's series staged for the second pass, as the CLI
            from bids_fmristore.participant.denoised import stage_voxels

            stage = stage_voxels(info.shape[3], layout.counts, out_dir)
        with MultiScanWriter(out_dir / "b.h5", geometry=geom, layout=layout, store="both",
                             overwrite=True) as w:
            scan = w.add_scan("run", info.shape[3], {"TR": 2.0})

            def sink(t0, block):
                scan.write_grouped(block)
                if stage is not None:
                    stage.write(t0, block)

            (means,) = parcellate_run(info, [parcels], [sink])
            scan.write_summary(means)
        if mode == "h5-denoise":
            from bids_fmristore.compute.denoise import CleanOptions, clean_signals
            from bids_fmristore.inputs.confounds import ConfoundsSpec, load_run_confounds
            from bids_fmristore.participant.denoised import clean_clusters

            confounds = load_run_confounds(fmriprep_named(bold), ConfoundsSpec("simple"),
                                           info.shape[3])
            opts = CleanOptions(t_r=2.0)
            with stage, MultiScanWriter(out_dir / "d.h5", geometry=geom, layout=layout,
                                        store="both", overwrite=True) as w:
                scan = w.add_scan("run", info.shape[3], {"TR": 2.0})
                scan.write_summary(clean_signals(means, confounds.table, None, opts))
                bands = (band for _, band in stage.series())
                for k, block in clean_clusters(bands, layout.counts, confounds.table, None,
                                               opts):
                    scan.write_cluster(k, block, copy=False)
    elif mode == "nilearn":
        from nilearn.maskers import NiftiLabelsMasker

        NiftiLabelsMasker(labels_img=str(atlas), mask_img=str(mask), resampling_target="data",
                          standardize=None).fit_transform(str(bold))


def _dense_or_latent(mode, info, bold: Path, mask: Path, brain, parcels, out_dir: Path) -> None:
    """The participant level's own per-run sink (participant/dense.py) on the bench run."""
    from bids_fmristore.compute.parcellate import parcellate_run
    from bids_fmristore.inputs.discovery import BoldRun, Dataset
    from bids_fmristore.participant.dense import RunOutputs, run_outputs_sink

    dataset = Dataset("bench", bold.parent, True)
    run = BoldRun(bold, dataset, {"subject": "01", "task": "rest"}, 2.0, mask, dataset)
    path = out_dir / ("d.h5" if mode == "dense" else "l.lv.h5")
    plan = RunOutputs(path if mode == "dense" else None, path if mode == "latent" else None,
                      brain, {path: {}})
    with run_outputs_sink(plan, "run", run, info, components=LATENT_K) as sink:
        parcellate_run(info, [parcels], block_sink=sink.write, on_read=sink.on_read)


def import_modules(mode: str) -> None:
    """Import what a mode uses before the clock starts: start-up is not what is compared."""
    if mode in ("floor", "floor4"):
        import isal.igzip  # noqa: F401
    elif mode in ("means", "h5", "denoise", "h5-denoise", "dense", "latent"):
        import nibabel  # noqa: F401
        import pandas  # noqa: F401

        if mode in ("dense", "latent"):
            import bids_fmristore.participant.dense  # noqa: F401

        if mode in ("denoise", "h5-denoise"):
            import nilearn.interfaces.fmriprep  # noqa: F401
            import nilearn.signal  # noqa: F401

        import bids_fmristore.atlas  # noqa: F401
        import bids_fmristore.compute.parcellate  # noqa: F401
        import bids_fmristore.formats.multiscan  # noqa: F401
    elif mode in ("participant", "participant-report"):
        import bids_fmristore.cli.levels  # noqa: F401
        import bids_fmristore.cli.run  # noqa: F401
        import bids_fmristore.inputs.discovery  # noqa: F401
        import bids_fmristore.participant  # noqa: F401
    else:
        import nilearn.maskers  # noqa: F401


def child_main(args: list[str]) -> None:
    mode, bold, atlas, mask, out_dir = args
    import_modules(mode)
    remove_outputs(Path(out_dir))
    t0, c0 = time.perf_counter(), time.process_time()
    work(mode, Path(bold), Path(atlas), Path(mask), Path(out_dir))
    wall = time.perf_counter() - t0
    print(json.dumps({"wall": wall, "cpu": time.process_time() - c0,
                      "peak_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB.

    Linux's ``ru_maxrss`` survives ``exec`` and so counts the parent's memory at fork time;
    ``VmHWM`` belongs to this process image only.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024




def measure(mode: str, paths, out_dir: Path) -> dict:
    if mode.startswith("cli-"):
        ds = command.make_dataset(*paths, out_dir.parent / f"e2e-{paths[0].name.split('.')[0]}")
        return command.run_command(ds, out_dir / mode, *command.CLI_MODES[mode])
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, *map(str, paths), str(out_dir)],
        capture_output=True, text=True, env=env, check=False,
    )
    if proc.returncode:
        raise RuntimeError(f"{mode} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--data-dir", type=Path, default=HERE / "_data")
    a = p.parse_args()
    if a.quick:
        a.cases, a.rounds = ["f32-T300-L400"], 2
    print(f"cores: {os.cpu_count()}, python {sys.version.split()[0]}")
    if any(m.startswith(("cli-", "participant")) for m in a.modes):  # timed from outside
        print(command.compile_package())
    header = f"{'case':16s} " + " ".join(f"{m + ' s':>10s} {m + ' MB':>10s}" for m in a.modes)
    rows = []
    for case in a.cases:
        paths = ensure_data(case, a.data_dir)
        results: dict[str, list[dict]] = {m: [] for m in a.modes}
        with tempfile.TemporaryDirectory(dir=a.data_dir) as tmp:
            for _ in range(a.rounds):  # interleave modes so that drift hits all equally
                for mode in a.modes:
                    results[mode].append(measure(mode, paths, Path(tmp)))
        med = {m: statistics.median(r["wall"] for r in results[m]) for m in a.modes}
        # CPU time of the process, all threads: what the work costs, whatever the overlap
        cpu = {m: statistics.median(r["cpu"] for r in results[m]) for m in a.modes}
        peak = {m: max(r["peak_mb"] for r in results[m]) for m in a.modes}
        rows.append((case, med, cpu))
        print(header if len(rows) == 1 else "", end="\n" if len(rows) == 1 else "")
        print(f"{case:16s} " + " ".join(f"{med[m]:10.2f} {peak[m]:10.0f}" for m in a.modes))
        print(f"{'  CPU s':16s} " + " ".join(f"{cpu[m]:10.2f} {'':10s}" for m in a.modes))
    for title, which in (("wall time", 1), ("CPU time, all threads", 2)):
        print(f"\nratios (median {title}):")
        for row in rows:
            case, med = row[0], row[which]
            parts = [f"{label}: {med[num] / med[den]:.2f}" for label, num, den in RATIOS
                     if num in med and den in med]
            parts += [f"{label}: {(med[x] - med[y]) / med[u]:.2f}" for label, x, y, u in ADDED
                      if x in med and y in med and u in med]
            print(f"  {case:16s} " + "   ".join(parts))


if __name__ == "__main__":
    main()

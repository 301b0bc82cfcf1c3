"""``bids_fmristore export FILE.h5 OUT_DIR``: the command line of :mod:`bids_fmristore.export`."""

from __future__ import annotations

import argparse
from pathlib import Path

from bids_fmristore.cli.run import run_command
from bids_fmristore.export import FORMATS, export_file
from bids_fmristore.resources import resume_collections

__all__ = ["build_export_parser", "export_main"]


def build_export_parser() -> argparse.ArgumentParser:
    """Command line of ``bids_fmristore export``."""
    parser = argparse.ArgumentParser(
        prog="bids_fmristore export",
        description="Write an fmristore file as float32 NIfTI images: one per label "
                    "(LabeledVolumeSet), one 3-D/4-D image (H5NeuroVol/H5NeuroVec), or one "
                    "4-D image per scan with voxel data (H5ParcellatedMultiScan); as .nii.gz, "
                    ".nii or NIfTI-Zarr (.nii.zarr).",
        epilog="exit codes: 0 success; 2 usage (an output exists without --overwrite: nothing "
               "written; unknown --labels; --format nifti-zarr without the zarr extra); 3 FILE "
               "unreadable, truncated, missing a dataset or not a supported layout, or an image "
               "cannot be written (nothing written); 1 bug")
    parser.add_argument("file", metavar="FILE", type=Path, help="fmristore .h5 file")
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path,
                        help="folder for the images (created if needed)")
    parser.add_argument("--format", dest="image_format", choices=FORMATS, default="nifti",
                        help="nifti: one .nii.gz (.nii) file per image (default); nifti-zarr: "
                             "one .nii.zarr folder per image (multiscale, chunked, NIfTI header "
                             "kept; needs pip install 'bids_fmristore[zarr]')")
    parser.add_argument("--no-compress", dest="compress", action="store_false",
                        help="write .nii instead of .nii.gz (nifti-zarr: uncompressed chunks)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing images")
    parser.add_argument("--labels", nargs="+", action="extend", metavar="L",
                        help="export only these labels (or scans of a multiscan file)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("--debug", action="store_true", help="debug logs")
    return parser


def export_main(argv: list[str] | None = None) -> int:
    """Run ``bids_fmristore export``; print the written paths; return the exit code."""
    try:
        opts = build_export_parser().parse_args(argv)
    except SystemExit as stop:  # --help (0) or a usage error (2), already printed
        return int(stop.code or 0)

    def export() -> int:
        resume_collections()
        written = export_file(opts.file, opts.out_dir, compress=opts.compress,
                              overwrite=opts.overwrite, labels=opts.labels,
                              image_format=opts.image_format)
        for target in written:
            print(target)
        return 0

    # Quiet unless asked: the written paths on stdout are the output (scripts read them).
    return run_command(export, verbose=opts.verbose, debug=opts.debug,
                       quiet=not (opts.verbose or opts.debug))

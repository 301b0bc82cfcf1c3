"""Command-line arguments (BIDS-Apps conventions, flag names as fMRIPrep/XCP-D use them).

Building the parser has no side effects; :mod:`bids_fmristore.cli.run` acts on the result.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bids_fmristore import __version__

__all__ = ["build_parser", "parse_name_path", "strip_prefix"]

USAGE = """\
bids_fmristore BIDS_DIR OUTPUT_DIR {participant,group} [options]
       bids_fmristore export FILE OUT_DIR [options]   (see bids_fmristore export --help)"""

EPILOG = """\
other commands:
  bids_fmristore export FILE.h5 OUT_DIR   write an fmristore file's volumes as NIfTI

logging:
  stderr shows INFO by default (progress, one line per subject, warnings such as kept files,
  errors, a summary); -q only warnings and errors; -v also DEBUG detail (each file written);
  --debug also tracebacks. Every invocation also writes a DEBUG log with timestamps to
  OUTPUT_DIR/logs/bids_fmristore_<level>_<YYYYmmdd-HHMMSS>_<pid>.log.

exit codes:
  0    success
  1    unexpected internal error (a bug: please report it with the traceback)
  2    command-line usage error; OUTPUT_DIR inside BIDS_DIR (only BIDS_DIR/derivatives/<name>
       is allowed); OUTPUT_DIR or -w is a file, cannot be created or is not writable
  3    input dataset problem (missing BIDS_DIR, unknown participant, no BOLD run matches),
       or an output cannot be written (disk full, permission denied)
  4    atlas problem (missing file, non-integer labels, bad label table)
  5    some runs or subjects failed; the others were written
  130  interrupted (Ctrl-C, SIGINT); partial files removed
  143  terminated (SIGTERM, e.g. the SLURM time limit); partial files removed
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Raw epilog, and ``(default: X)`` after every option that has a meaningful default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.default in (None, False, [], argparse.SUPPRESS)
                or not action.option_strings):
            return text
        return text + " (default: %(default)s)"



def strip_prefix(prefix: str):
    """argparse ``type`` that accepts ``01`` as well as ``sub-01`` (for ``prefix="sub-"``)."""

    def convert(value: str) -> str:
        label = value[len(prefix):] if value.startswith(prefix) else value
        if not label or not label.replace("+", "").isalnum():
            raise argparse.ArgumentTypeError(f"invalid label {value!r}")
        return label

    return convert


def parse_name_path(value: str) -> tuple[str, Path]:
    """``NAME=PATH`` → (NAME, PATH); a bare PATH is named after its folder."""
    name, sep, path = value.partition("=")
    if not sep:
        path = value
        name = Path(value).resolve().name
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    return name, Path(path)


def _atlas(value: str):
    from bids_fmristore.atlas.request import parse_atlas_arg

    try:
        return parse_atlas_arg(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _space(value: str) -> tuple[str, str | None]:
    """``MNI152NLin2009cAsym`` or ``MNI152NLin2009cAsym:res-2`` → (space, res)."""
    space, _, rest = value.partition(":")
    res = None
    if rest:
        key, _, res = rest.partition("-")
        if key != "res" or not res.isalnum():
            raise argparse.ArgumentTypeError(f"expected SPACE[:res-LABEL], got {value!r}")
    if not space.replace("+", "").isalnum():
        raise argparse.ArgumentTypeError(f"invalid space {space!r}")
    return space, res


def _filter_file(value: str) -> dict:
    path = Path(value)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise argparse.ArgumentTypeError(f"cannot read {value}: {err.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise argparse.ArgumentTypeError(f"{value} is not valid JSON ({err})") from None
    if not isinstance(content, dict) or not all(isinstance(v, dict) for v in content.values()):
        raise argparse.ArgumentTypeError(
            f"{value}: expected an object of queries, e.g. {{\"bold\": {{\"acquisition\": \"x\"}}}}"
        )
    return content


def _fraction(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {value!r}")
    return number


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return number


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def _components(value: str) -> int | float:
    """``--latent``: a number of components (integer >= 1) or a variance fraction in (0, 1)."""
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if number.is_integer() and number >= 1 and "." not in value:
        return int(number)
    if 0.0 < number < 1.0:
        return number
    raise argparse.ArgumentTypeError(
        f"expected a number of components (an integer >= 1) or a fraction of variance "
        f"between 0 and 1 (exclusive), got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    """The ``bids_fmristore`` argument parser."""
    p = argparse.ArgumentParser(
        prog="bids_fmristore",
        description="Parcellate BIDS/fMRIPrep BOLD runs into fmristore HDF5 files.",
        usage=USAGE,
        epilog=EPILOG,
        formatter_class=_HelpFormatter,
    )
    p.add_argument("bids_dir", type=Path, metavar="BIDS_DIR",
                   help="raw BIDS dataset, or an fMRIPrep derivatives folder")
    p.add_argument("output_dir", type=Path, metavar="OUTPUT_DIR",
                   help="where outputs go, created if needed (not inside BIDS_DIR, except "
                   "under BIDS_DIR/derivatives/)")
    p.add_argument("analysis_level", choices=["participant", "group"],
                   help="participant: one file per subject, atlas and BOLD grid (plus the "
                   "subject's voxel-wise maps), for the selected subjects (run it once per "
                   "subject in parallel jobs if you like); group: once all participants are "
                   "done, LabeledVolumeSets of their maps, or of a --cohort-file")
    p.add_argument("--version", action="version", version=f"bids_fmristore {__version__}")

    g = p.add_argument_group("selecting data")
    g.add_argument("--participant-label", "--participant_label", nargs="+",
                   type=strip_prefix("sub-"), metavar="LABEL", dest="participant_label",
                   help="subjects to process (01 or sub-01); default: all")
    g.add_argument("--session-label", "--session_label", nargs="+", type=strip_prefix("ses-"),
                   metavar="LABEL", dest="session_label",
                   help="sessions to process; outputs are then written per session")
    g.add_argument("-t", "--task-id", "--task_id", nargs="+", type=strip_prefix("task-"),
                   metavar="TASK", dest="task_id", help="tasks to process; default: all")
    g.add_argument("--bids-filter-file", "--bids_filter_file", type=_filter_file,
                   metavar="FILE", dest="bids_filters",
                   help='JSON of pybids filters per query ("bold", "mask")')
    g.add_argument("-d", "--derivatives", nargs="+", action="extend", type=parse_name_path,
                   metavar="NAME=PATH", default=[],
                   help="preprocessed derivatives (e.g. fmriprep=/data/derivatives/fmriprep)")
    g.add_argument("--space", type=_space, default=("MNI152NLin2009cAsym", None),
                   metavar="SPACE[:res-N]",
                   help="template space of the BOLD runs (default: MNI152NLin2009cAsym, any res)")
    g.add_argument("--skip-bids-validation", "--skip_bids_validation", action="store_true",
                   dest="skip_bids_validation", help="do not validate BIDS_DIR file names")
    g.add_argument("--bids-database-dir", type=Path, metavar="DIR",
                   help="shared pybids index of all subjects, built once (by --index-only or "
                   "the first job) and then read by every job (e.g. of a SLURM array)")
    g.add_argument("--index-only", action="store_true",
                   help="build the --bids-database-dir index and stop (run it once before an "
                   "array of participant jobs)")

    g = p.add_argument_group("atlases and outputs")
    g.add_argument("--atlas", nargs="+", action="extend", type=_atlas, default=[],
                   metavar="ATLAS",
                   help="NAME=PATH of a labels NIfTI (_dseg.nii.gz) with a sibling .tsv "
                   "(index, name); or LABEL[:desc-DESC] of an atlas in a -d atlas dataset "
                   "(BIDS atlas layout) or in the local TemplateFlow cache; repeatable")
    g.add_argument("--allow-atlas-space-mismatch", action="store_true",
                   help="use an atlas whose template differs from --space (warns)")
    g.add_argument("--store", choices=["summary", "full", "both"], default="both",
                   help="parcel means, every voxel's series, or both")
    g.add_argument("--min-coverage", "--min_coverage", type=_fraction, default=0.5,
                   dest="min_coverage", metavar="F",
                   help="parcels with less than this fraction of their voxels inside the brain "
                   "mask get NaN summaries (default: %(default)s, as XCP-D)")
    g.add_argument("--tsv", action="store_true",
                   help="also write XCP-D-style per-run tables: stat-mean_timeseries, "
                   "stat-coverage_bold and stat-pearsoncorrelation_relmat (.tsv)")
    g.add_argument("--overwrite", action="store_true",
                   help="rebuild every output (default: keep the outputs that are complete and "
                   "up to date, rebuild the others)")
    # issue 12: per-run voxel-level files (participant/dense.py)
    g.add_argument("--dense", action="store_true",
                   help="also write each run whole as an fmristore H5NeuroVec "
                   "(..._desc-preproc_bold.h5), in the same pass")
    g.add_argument("--latent", type=_components, metavar="K",
                   help="also write each run's PCA as an fmristore LatentNeuroVec "
                   "(..._desc-latent_bold.lv.h5): K components, or 0<K<1 for the fewest "
                   "components explaining that fraction of the in-mask variance")

    g = p.add_argument_group(
        "denoising (parcel means, as nilearn's NiftiLabelsMasker with fMRIPrep confounds)")
    g.add_argument("--denoise", action="append", default=[], metavar="STRATEGY",
                   choices=["simple", "scrubbing", "compcor", "ica_aroma"],
                   help="confounds strategy of nilearn's load_confounds_strategy (repeatable: "
                   "one desc-<strategy> file each; one strategy gives desc-denoised)")
    g.add_argument("--confounds", nargs="+", action="extend", default=[], metavar="COL",
                   help="explicit confounds columns, alone or added to --denoise")
    g.add_argument("--fd-threshold", type=_positive_float, metavar="MM",
                   help="framewise displacement above which a volume is censored (scrubbing; "
                   "default: nilearn's)")
    g.add_argument("--std-dvars-threshold", type=_positive_float, metavar="X",
                   help="standardized DVARS above which a volume is censored (scrubbing; "
                   "default: nilearn's)")
    g.add_argument("--high-pass", type=_positive_float, metavar="HZ", help="high-pass cutoff")
    g.add_argument("--low-pass", type=_positive_float, metavar="HZ", help="low-pass cutoff")
    g.add_argument("--detrend", action="store_true", help="remove linear trends")
    g.add_argument("--standardize", choices=["zscore_sample", "psc", "none"], default="none",
                   help="standardize the cleaned signals (default: %(default)s, nilearn's "
                   "masker default)")

    g = p.add_argument_group("group level")
    g.add_argument("--group-by", choices=["subject", "run"], default="subject",
                   help="one volume per subject (its average over runs) or per run")
    g.add_argument("--group-mask-threshold", type=_fraction, default=1.0, metavar="F",
                   help="group mask: voxels inside at least this fraction of the masks "
                   "(default: %(default)s = all)")
    g.add_argument("--cohort-file", type=Path, metavar="CSV",
                   help="ModelArrayIO-style cohort (scalar_name, source_file, "
                   "source_mask_file, covariates): one LabeledVolumeSet per scalar")
    g.add_argument("--group-mask", type=Path, metavar="FILE",
                   help="explicit group mask (NIfTI) for --cohort-file")

    # -- visual reports (bids_fmristore.report) --
    g = p.add_argument_group("reports")
    g.add_argument("--no-report", action="store_true",
                   help="do not write the HTML reports (OUTPUT_DIR/sub-<label>.html, "
                   "OUTPUT_DIR/group.html)")
    g.add_argument("--reports-only", action="store_true",
                   help="only rebuild the reports from the outputs already in OUTPUT_DIR "
                   "(no BOLD data read, no data file written)")

    g = p.add_argument_group("resources and logging")
    g.add_argument("-w", "--work-dir", type=Path, metavar="DIR",
                   help="scratch folder (holds the pybids database unless --bids-database-dir)")
    g.add_argument("--nprocs", "--nthreads", "--n_cpus", type=_positive_int, default=1,
                   dest="nprocs", metavar="N",
                   help="runs parcellated in parallel processes (1: a subject's runs are read "
                        "two at a time in threads when 2 CPUs are available)")
    g.add_argument("-v", "--verbose", action="count", default=0,
                   help="DEBUG detail on stderr (each file written), no tracebacks")
    g.add_argument("-q", "--quiet", action="store_true",
                   help="only warnings and errors on stderr (the log file keeps everything)")
    g.add_argument("--debug", action="store_true", help="DEBUG detail and tracebacks")
    return p

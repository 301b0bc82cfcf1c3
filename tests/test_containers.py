"""Container recipes, the lock file and the SLURM scripts, without a container engine.

No Docker or Apptainer runs here: the recipes are checked statically (pins, labels, what they
copy and install), the Singularity ``%test`` and the SLURM scripts are executed with stand-ins
for ``apptainer`` and ``bids_fmristore``. ``tests/test_slurm.py`` runs the scripts on SLURM.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import bids_fmristore
from bids_fmristore.derivatives import _CODE_URL

ROOT = Path(__file__).resolve().parents[1]
ARRAY = ROOT / "containers" / "slurm_participant_array.sh"
GROUP = ROOT / "containers" / "slurm_group.sh"
CONSTRAINTS = ROOT / "constraints.txt"
BASE = re.compile(r"python:(3\.\d+\.\d+)-slim-bookworm")
#: Repository paths the images carry (the suite in the image reads them).
SHIPPED = {"pyproject.toml", "README.md", "constraints.txt", "bids_fmristore", "tests", "bench",
           "containers", ".ci", "Dockerfile", "Singularity.def", ".dockerignore"}
OCI = {"title": "bids_fmristore", "version": bids_fmristore.__version__, "licenses": "MIT",
       "source": _CODE_URL}


def _sections(text: str) -> dict[str, str]:
    """Singularity definition sections: ``{"post": body, "apprun pytest": body, ...}``."""
    parts = re.split(r"^%(\w+(?: \w+)?)[ \t]*$", text, flags=re.MULTILINE)
    return {name: body for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def _dockerfile() -> list[str]:
    """Instructions, comments dropped (first, as Docker does), continuation lines joined."""
    lines = [ln for ln in (ROOT / "Dockerfile").read_text().splitlines()
             if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def _stages() -> dict[str, list[str]]:
    stages: dict[str, list[str]] = {}
    name = None
    for i, line in enumerate(_dockerfile()):
        if line.startswith("FROM "):
            words = line.split()
            name = words[3] if len(words) == 4 and words[2] == "AS" else f"#{i}"
            stages[name] = [line]
        else:
            stages[name].append(line)
    return stages


def _labels(lines: list[str]) -> dict[str, str]:
    found = {}
    for line in lines:
        if line.startswith("LABEL "):
            found.update(re.findall(r'org\.opencontainers\.image\.([\w.]+)="([^"]*)"', line))
    return found


def _pins() -> dict[str, tuple[str, str]]:
    """``{canonical name: (name, version)}`` of constraints.txt; every line ``name==version``."""
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and re.fullmatch(r"[A-Za-z0-9][\w.-]*", name), line
        assert re.fullmatch(r"[\w.+!]+", version), line  # exact, no range, no marker
        key = canonicalize_name(name)
        assert key not in pins, f"{name} pinned twice"
        pins[key] = (name, version)
    return pins


def _freeze_module():
    spec = importlib.util.spec_from_file_location(
        "freeze_constraints", ROOT / "containers" / "freeze_constraints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the lock --------------------------------------------------------------------------------

def test_constraints_pin_every_dependency_within_its_declared_range():
    freeze = _freeze_module()
    pins = _pins()
    roots = freeze.requirements()
    needed = freeze.closure(roots)  # from the installed distributions' own metadata
    missing = sorted(n for n in needed if canonicalize_name(n) not in pins)
    assert not missing, f"not in constraints.txt: {missing} (containers/freeze_constraints.py)"
    for req in roots:  # the pins honour pyproject.toml (e.g. nilearn != 0.13.0)
        assert req.specifier.contains(pins[canonicalize_name(req.name)][1], prereleases=True), req
    for name, version in freeze.BUILD.items():
        assert pins[canonicalize_name(name)][1] == version
    build = tomllib_load(ROOT / "pyproject.toml")["build-system"]["requires"]
    for line in build:
        req = Requirement(line)
        assert req.specifier.contains(pins[canonicalize_name(req.name)][1]), req


def test_installed_versions_are_the_locked_ones():
    """The suite runs on the pinned versions: CI installs with -c constraints.txt."""
    freeze = _freeze_module()
    pins = _pins()
    installed = freeze.closure(freeze.requirements())
    differ = {name: (version, pins[canonicalize_name(name)][1]) for name, version in
              installed.items() if pins[canonicalize_name(name)][1] != version}
    assert not differ, ("installed != constraints.txt (name: (installed, pinned)): "
                        f"{differ}; pip install -c constraints.txt '.[test]'")


def test_constraints_interpreter_is_the_image_base():
    header = CONSTRAINTS.read_text().splitlines()[:3]
    (python,) = re.findall(r"CPython (3\.\d+\.\d+)", "\n".join(header))
    froms = [ln.split()[1] for ln in _dockerfile() if ln.startswith("FROM ")]
    assert BASE.fullmatch(froms[0]).group(1) == python
    singularity = re.search(r"^From: (\S+)$", (ROOT / "Singularity.def").read_text(), re.M)
    assert singularity.group(1) == froms[0]


def tomllib_load(path: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads(path.read_text())


# --- Dockerfile ------------------------------------------------------------------------------

def test_dockerfile_runtime_stage():
    stages = _stages()
    runtime = stages["runtime"]
    base = runtime[0].split()[1]
    assert BASE.fullmatch(base), base  # an exact x.y.z tag, never a moving one
    labels = _labels(runtime)
    assert {k: labels[k] for k in OCI} == OCI
    assert labels["base.name"] == f"docker.io/library/{base}"
    assert labels["revision"] == "${VCS_REF}" and labels["created"] == "${BUILD_DATE}"
    text = "\n".join(runtime)
    assert "ARG BIDS_FMRISTORE_CONTAINER_TAG" in text and "ARG VCS_REF" in text
    env = " ".join(ln for ln in runtime if ln.startswith("ENV "))
    for setting in ("BIDS_FMRISTORE_CONTAINER_TYPE=docker", "TEMPLATEFLOW_HOME=/templateflow"):
        assert setting in env.split()
    (install,) = [ln for ln in runtime if "pip install" in ln]
    assert "PIP_CONSTRAINT=/opt/bids_fmristore/src/constraints.txt" in install
    assert 'pip install --no-cache-dir -c constraints.txt ".[fast,test]"' in install
    assert "rm -rf bids_fmristore" in install  # the tests then import the installed package
    assert [ln.split()[1:] for ln in runtime if ln.startswith("COPY ")] == [[".", "."]]
    assert "WORKDIR /opt/bids_fmristore/src" in runtime
    entry = [ln for ln in runtime if ln.startswith("ENTRYPOINT")]
    assert len(entry) == 1 and json.loads(entry[0].split(None, 1)[1]) == ["bids_fmristore"]
    user = [ln for ln in runtime if ln.startswith("USER ")]
    assert user and user[-1] not in ("USER root", "USER 0")


def test_dockerfile_test_stage_and_default_target():
    stages = _stages()
    test = stages["test"]
    assert test[0] == "FROM runtime AS test"
    assert "USER root" in test  # the SLURM test starts slurmd
    (apt,) = [ln for ln in test if "apt-get install" in ln]
    assert "slurm-wlm munge" in apt
    cmd = [ln for ln in test if ln.startswith("CMD ")]
    assert json.loads(cmd[-1].split(None, 1)[1])[:3] == ["python", "-m", "pytest"]
    assert "ENTRYPOINT []" in test
    last = list(stages.values())[-1]
    assert last == ["FROM runtime"]  # `docker build .` gives the runtime image


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule for our patterns: a match on the path or any of its parent folders."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        forms = {pattern, pattern.removeprefix("**/")}
        if any(fnmatch.fnmatchcase(p, f) for p in prefixes for f in forms):
            result = not negate
    return result


def test_dockerignore_sends_what_the_images_need():
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    for path in sorted(SHIPPED) + ["tests/data/fmristore-written", "tests/conftest.py",
                                   ".ci/run", "containers/slurm_group.sh"]:
        assert not _ignored(path, patterns), path
    for junk in (".git", "tests/__pycache__/x.pyc", "bench/_data/a.nii.gz", "example/out",
                 "bids_fmristore.egg-info", ".pytest_cache"):
        assert _ignored(junk, patterns), junk


# --- Singularity.def -------------------------------------------------------------------------

def test_singularity_definition():
    text = (ROOT / "Singularity.def").read_text()
    header = [ln for ln in text.splitlines() if ln and not ln.startswith("#")][:2]
    assert header[0] == "Bootstrap: docker" and BASE.fullmatch(header[1].split()[1])
    sections = _sections(text)
    assert sections["runscript"].strip() == 'exec bids_fmristore "$@"'
    post = sections["post"]
    assert "PIP_CONSTRAINT=/opt/bids_fmristore/src/constraints.txt" in post
    assert 'pip install --no-cache-dir -c constraints.txt ".[fast,test]"' in post
    assert "rm -rf bids_fmristore" in post
    assert "export BIDS_FMRISTORE_CONTAINER_TYPE=singularity" in sections["environment"]
    files = [ln.split() for ln in sections["files"].splitlines() if ln.strip()]
    assert {src for src, _ in files} == SHIPPED
    assert all(dst == f"/opt/bids_fmristore/src/{src}" for src, dst in files)
    labels = dict(ln.strip().split(None, 1) for ln in sections["labels"].splitlines()
                  if ln.strip())
    assert {k: labels[f"org.opencontainers.image.{k}"] for k in OCI} == OCI
    apprun = sections["apprun pytest"]
    assert "cd /opt/bids_fmristore/src" in apprun
    assert 'exec python -m pytest -p no:cacheprovider "$@"' in apprun


def _shims(folder: Path) -> dict[str, str]:
    """``python`` and ``bids_fmristore`` on PATH as this interpreter and this checkout."""
    folder.mkdir()
    for name, line in (("python", f'exec {sys.executable} "$@"'),
                       ("bids_fmristore", f'exec {sys.executable} -m bids_fmristore "$@"')):
        path = folder / name
        path.write_text(f"#!/bin/sh\n{line}\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(ROOT)}


def test_singularity_test_section_runs_the_example(tmp_path):
    """%test is what `apptainer test` (and the end of `apptainer build`) runs, with /bin/sh."""
    script = tmp_path / "test.sh"
    script.write_text(_sections((ROOT / "Singularity.def").read_text())["test"])
    env = {**_shims(tmp_path / "bin"), "TMPDIR": str(tmp_path)}
    proc = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "test.sh"]  # trap cleaned up


# --- .ci/run ---------------------------------------------------------------------------------

def test_ci_installs_from_the_lock_and_the_debian_packages():
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert lines[-1] == 'pip install -c constraints.txt ".[test]" && python -m pytest'
    text = "\n".join(lines)
    assert "apt-get install" in text and "slurm-wlm munge" in text
    for cmd in ("munged", "slurmctld", "slurmd", "sbatch"):
        assert cmd in text


# --- SLURM scripts (run with stand-ins; tests/test_slurm.py submits them for real) ----------

def test_array_and_group_scripts_parse():
    for script in (ARRAY, GROUP):
        subprocess.run(["bash", "-n", str(script)], check=True, capture_output=True)
        assert script.read_text().startswith("#!/bin/bash")


def test_array_and_group_script_directives():
    for script, name in ((ARRAY, "bids_fmristore"), (GROUP, "bids_fmristore_group")):
        text = script.read_text()
        assert re.search(rf"^#SBATCH --job-name={name}$", text, flags=re.MULTILINE)
        for directive in ("--cpus-per-task=", "--mem=", "--time=", "--output="):
            assert re.search(rf"^#SBATCH {directive}\S+$", text, flags=re.MULTILINE)
        assert "BIDS_FMRISTORE_CMD" in text
    assert "--dependency=afterok:" in GROUP.read_text()


def _recorder(folder: Path, name: str, code: int = 0) -> Path:
    """A stand-in command writing its argv (one per line) and a few variables, exiting ``code``."""
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > "{folder}/{name}.args"\n'
                    f'env > "{folder}/{name}.env"\nexit {code}\n')
    path.chmod(0o755)
    return path


def _array_env(tmp_path: Path, task: int, **extra: str) -> dict[str, str]:
    bids = tmp_path / "bids"
    (bids / "derivatives" / "fmriprep").mkdir(parents=True, exist_ok=True)
    # CRLF, as a TSV saved on Windows; task i reads row i+1 after the header
    (bids / "participants.tsv").write_bytes(b"participant_id\tage\r\nsub-01\t30\r\nsub-02\t31\r\n")
    (tmp_path / "atlas").mkdir(exist_ok=True)
    (tmp_path / "scratch").mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**env, "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_JOB_ID": "77",
            "SLURM_CPUS_PER_TASK": "3", "BIDS_DIR": str(bids), "OUTPUT_DIR": str(tmp_path / "out"),
            "ATLAS": f"A={tmp_path / 'atlas' / 'atlas-A_dseg.nii.gz'}",
            "SCRATCH_DIR": str(tmp_path / "scratch"), **extra}


def test_array_task_runs_its_participant_through_the_command(tmp_path):
    cmd = _recorder(tmp_path / "bin", "fake", code=5)
    env = _array_env(tmp_path, 1, BIDS_FMRISTORE_CMD=f"{cmd} --flag",
                     EXTRA_ARGS="--store summary -v")
    proc = subprocess.run(["bash", str(ARRAY)], env=env, capture_output=True, text=True,
                          timeout=30, check=False)
    assert proc.returncode == 5, proc.stderr  # the task exits with bids_fmristore's code
    assert proc.stdout.startswith("task 1: sub-02 on ")
    args = (tmp_path / "bin" / "fake.args").read_text().splitlines()
    work = args[args.index("-w") + 1]
    assert args == ["--flag", str(tmp_path / "bids"), str(tmp_path / "out"), "participant",
                    "--participant-label", "sub-02",
                    "-d", f"fmriprep={tmp_path / 'bids' / 'derivatives' / 'fmriprep'}",
                    "--atlas", f"A={tmp_path / 'atlas' / 'atlas-A_dseg.nii.gz'}",
                    "--nprocs", "3", "-w", work, "--store", "summary", "-v"]
    assert Path(work).parent == tmp_path / "scratch" and Path(work).name.startswith(
        "bids_fmristore.77.1.")
    assert not Path(work).exists()  # removed when the task ends, even on failure


def test_array_task_in_the_image_binds_inputs_and_templateflow(tmp_path):
    _recorder(tmp_path / "bin", "apptainer")
    tf = tmp_path / "templateflow"
    tf.mkdir()
    env = _array_env(tmp_path, 0, IMAGE=str(tmp_path / "img.sif"), TEMPLATEFLOW_HOME=str(tf),
                     ATLAS="Schaefer2018:desc-100Parcels7Networks")
    env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}"
    proc = subprocess.run(["bash", str(ARRAY)], env=env, capture_output=True, text=True,
                          timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "bin" / "apptainer.args").read_text().splitlines()
    assert args[:2] == ["run", "--cleanenv"]
    binds = {args[i + 1] for i, a in enumerate(args) if a == "-B"}
    bids, out = tmp_path / "bids", tmp_path / "out"
    work = args[args.index("-w") + 1]
    assert binds == {f"{bids}:{bids}:ro", f"{bids}/derivatives/fmriprep:"
                     f"{bids}/derivatives/fmriprep:ro", f"{out}:{out}", f"{tf}:{tf}:ro",
                     f"{work}:{work}"}
    image = args.index(str(tmp_path / "img.sif"))
    assert args[image + 1:image + 4] == [str(bids), str(out), "participant"]
    assert args[args.index("--atlas") + 1] == "Schaefer2018:desc-100Parcels7Networks"
    # --cleanenv drops TEMPLATEFLOW_HOME; the APPTAINERENV_ copy reaches the image
    assert f"APPTAINERENV_TEMPLATEFLOW_HOME={tf}" in (tmp_path / "bin" / "apptainer.env"
                                                       ).read_text().splitlines()


def test_array_task_past_the_last_participant_is_one_line(tmp_path):
    env = _array_env(tmp_path, 2, BIDS_FMRISTORE_CMD="false")
    proc = subprocess.run(["bash", str(ARRAY)], env=env, capture_output=True, text=True,
                          timeout=30, check=False)
    assert proc.returncode == 2
    assert proc.stderr == f"no participant in row 3 of {tmp_path / 'bids'}/participants.tsv\n"


def test_array_task_without_apptainer_says_so(tmp_path):
    (tmp_path / "empty").mkdir()
    # the check comes before any external command: an empty PATH is enough
    env = _array_env(tmp_path, 0, PATH=str(tmp_path / "empty"))
    proc = subprocess.run(["/bin/bash", str(ARRAY)], env=env, capture_output=True, text=True,
                          timeout=30, check=False)
    assert proc.returncode == 2
    assert proc.stderr == ("neither apptainer nor singularity is on PATH "
                           "(or set BIDS_FMRISTORE_CMD)\n")


def test_group_job_runs_the_group_level(tmp_path):
    cmd = _recorder(tmp_path / "bin", "fake")
    env = {**_array_env(tmp_path, 0), "BIDS_FMRISTORE_CMD": str(cmd), "SLURM_JOB_ID": "78",
           "GROUP_ARGS": "--group-mask-threshold 0.5"}
    (tmp_path / "out").mkdir()
    proc = subprocess.run(["bash", str(GROUP)], env=env, capture_output=True, text=True,
                          timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "bin" / "fake.args").read_text().splitlines()
    work = args[4]
    assert args == [str(tmp_path / "bids"), str(tmp_path / "out"), "group", "-w", work,
                    "--group-mask-threshold", "0.5"]
    assert Path(work).name.startswith("bids_fmristore.78.group.") and not Path(work).exists()

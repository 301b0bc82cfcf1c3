"""The SLURM recipe on a real single-node SLURM: participant array, then the group level.

The test starts munged, slurmctld and slurmd (Debian's ``munge`` and ``slurm-wlm``; ``.ci/run``
installs them) for localhost, without cgroups (``proctrack/linuxproc``, ``task/none``), from a
``slurm.conf`` in a temporary folder reached through ``SLURM_CONF``, on free ports. It submits
``containers/slurm_participant_array.sh`` as a 4-task array with the container step replaced
by this checkout (``BIDS_FMRISTORE_CMD``), then ``containers/slurm_group.sh`` with
``--dependency=afterok``, and checks the outputs against numpy. The daemons run as root (they
start jobs as the submitting user); every process they started is killed at teardown.
Deselect with ``-k 'not slurm'`` on a machine without SLURM.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import SPACE, make_atlas, make_fmriprep_run, make_raw, random_labels

import bids_fmristore
from bids_fmristore.formats.labeled import LabeledVolumeSet

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CONTAINERS = ROOT / "containers"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scancel")
NODE = "bfsnode"
SUBJECTS = ("01", "02", "03", "04")
SHAPE = (7, 6, 5)
N_TIME = 8
START_TIMEOUT = 30.0  # s until the node is idle
JOBS_TIMEOUT = 150.0  # s for the array and the group job (about 20 s here)


def _free_ports(n: int) -> tuple[int, ...]:
    """``n`` distinct ports free now (held open together so that none is returned twice)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return tuple(s.getsockname()[1] for s in sockets)
    finally:
        for s in sockets:
            s.close()


def _slurm_conf(folder: Path, munge: Path, host: str, ports: tuple[int, int], cpus: int,
                memory_mb: int) -> str:
    return f"""\
ClusterName=bfstest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge}/munge.socket
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/log/slurmctld.log
SlurmdLogFile={folder}/log/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={folder}/log/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
NodeName={NODE} NodeHostname={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb}
PartitionName=test Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class Cluster:
    folder: Path
    env: dict[str, str]
    procs: list[subprocess.Popen]

    def run(self, *argv: str, cwd: Path | None = None, env: dict | None = None) -> str:
        proc = subprocess.run(list(argv), env={**self.env, **(env or {})}, cwd=cwd,
                              capture_output=True, text=True, timeout=30, check=False)
        assert proc.returncode == 0, f"{argv}: {proc.stderr}\n{self.logs()}"
        return proc.stdout

    def logs(self) -> str:
        """The daemons' logs, for failure messages."""
        parts = []
        for path in sorted((self.folder / "log").glob("*")):
            text = path.read_text(errors="replace").splitlines()[-40:]
            parts.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(parts)

    def jobcomp(self) -> list[dict[str, str]]:
        """Finished jobs as recorded by jobcomp/filetxt (one ``Key=value ...`` line each)."""
        path = self.folder / "log" / "jobcomp.txt"
        lines = path.read_text().splitlines() if path.exists() else []
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in lines]

    def wait(self, job_ids: list[str], timeout: float) -> None:
        """Poll squeue until the jobs have left the queue; fail early on a broken dependency."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.run("squeue", "-h", "-j", ",".join(job_ids), "-o", "%i %T %r")
            if not out.strip():
                return
            assert "DependencyNeverSatisfied" not in out, f"{out}\n{self.logs()}"
            time.sleep(0.5)
        pytest.fail(f"jobs {job_ids} still queued after {timeout:.0f} s:\n"
                    f"{self.run('squeue', '-h')}\n{self.logs()}")


def _require_slurm() -> None:
    missing = [name for name in DAEMONS + CLIENTS + ("munge",) if shutil.which(name) is None]
    if missing:
        pytest.fail(f"the SLURM test needs Debian's slurm-wlm and munge ({', '.join(missing)} "
                    "not on PATH): apt-get install slurm-wlm munge, as .ci/run does; or "
                    "deselect it with -k 'not slurm'", pytrace=False)
    if os.geteuid() != 0:
        pytest.fail("the SLURM test starts slurmd, which runs jobs as their user: run it as "
                    "root (as .ci/run does), or deselect it with -k 'not slurm'", pytrace=False)


def _our_processes(conf: Path) -> list[int]:
    """Processes whose environment names our slurm.conf: daemons, slurmstepd, job scripts."""
    needle = f"SLURM_CONF={conf}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def _stop(cluster: Cluster, conf: Path) -> None:
    subprocess.run(["scancel", "--full", f"--user={os.getuid()}"], env=cluster.env,
                   capture_output=True, timeout=30, check=False)
    for proc in reversed(cluster.procs):
        proc.terminate()
    for proc in reversed(cluster.procs):
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for pid in _our_processes(conf):  # a slurmstepd or job left behind by a failed test
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    _require_slurm()
    folder = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log"):
        (folder / sub).mkdir()
    # short path: munge's socket path must fit in a sockaddr_un (108 bytes)
    munge = Path(tempfile.mkdtemp(prefix="bfs-munge-"))
    key = munge / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    host = socket.gethostname().split(".")[0]
    total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    conf = folder / "slurm.conf"
    # more CPUs or memory than slurmd finds would drain the node
    cpus = min(2, len(os.sched_getaffinity(0)))
    conf.write_text(_slurm_conf(folder, munge, host, _free_ports(2), cpus,
                                min(2048, total_mb // 2)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env["SLURM_CONF"] = str(conf)
    commands = [
        ["munged", "--foreground", "--force", f"--socket={munge / 'munge.socket'}",
         f"--key-file={key}", f"--pid-file={munge / 'munged.pid'}",
         f"--seed-file={munge / 'munged.seed'}", f"--log-file={folder / 'log' / 'munged.log'}"],
        ["slurmctld", "-D", "-i"],
        ["slurmd", "-D", "-N", NODE],
    ]
    c = Cluster(folder, env, [])
    try:
        for argv in commands:
            with open(folder / "log" / f"{argv[0]}.out", "wb") as out:
                # own session: a ^C of pytest must not reach them before teardown does
                c.procs.append(subprocess.Popen(argv, env=env, stdout=out,
                                                stderr=subprocess.STDOUT,
                                                start_new_session=True))
            if argv[0] == "munged":
                _wait_for(lambda: (munge / "munge.socket").exists(), c, "munged's socket")
        _wait_for(lambda: _node_state(c) == "idle", c, f"node {NODE} idle")
        yield c
    finally:
        _stop(c, conf)
        shutil.rmtree(munge, ignore_errors=True)


def _node_state(c: Cluster) -> str:
    proc = subprocess.run(["sinfo", "-h", "-N", "-n", NODE, "-o", "%T"], env=c.env,
                          capture_output=True, text=True, timeout=10, check=False)
    return proc.stdout.strip()


def _wait_for(ready, c: Cluster, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        dead = [p.args[0] for p in c.procs if p.poll() is not None]
        assert not dead, f"{dead} exited while waiting for {what}:\n{c.logs()}"
        if ready():
            return
        time.sleep(0.25)
    pytest.fail(f"no {what} after {START_TIMEOUT:.0f} s:\n{c.logs()}")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Four participants, one small run each, different brain masks; one atlas."""
    root = tmp_path_factory.mktemp("ds")
    rng = np.random.default_rng(20261202)
    bids = make_raw(root / "bids", subjects=SUBJECTS)
    labels = random_labels(SHAPE, 4, rng, background=0.2)
    atlas = make_atlas(root / "atlas", labels, np.eye(4), name="A")
    runs = {}
    for sub in SUBJECTS:
        data = rng.normal(100, 5, (*SHAPE, N_TIME)).astype(np.float32)
        mask = rng.random(SHAPE) > 0.2
        make_fmriprep_run(root / "fmriprep", data, np.eye(4), mask, sub=sub)
        runs[sub] = data, mask
    return {"root": root, "bids": bids, "fmriprep": root / "fmriprep", "atlas": atlas,
            "labels": labels, "runs": runs}


def _submit(cluster: Cluster, dataset: dict, out: Path, workdir: Path) -> tuple[str, str]:
    env = {
        "BIDS_DIR": str(dataset["bids"]), "OUTPUT_DIR": str(out),
        "FMRIPREP_DIR": str(dataset["fmriprep"]), "ATLAS": f"A={dataset['atlas']}",
        "SCRATCH_DIR": str(workdir / "scratch"), "EXTRA_ARGS": "--min-coverage 0",
        # the container step replaced by this checkout's package
        "BIDS_FMRISTORE_CMD": f"{sys.executable} -m bids_fmristore",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    (workdir / "scratch").mkdir()
    # The scripts' #SBATCH resources (4 CPUs, 8 GB) exceed this 2-CPU node: overridden here,
    # as users do for their cluster.
    small = ["--cpus-per-task=1", "--mem=256M", "--time=10"]
    array = cluster.run("sbatch", "--parsable", "--array=0-3", *small,
                        str(CONTAINERS / "slurm_participant_array.sh"), cwd=workdir, env=env)
    array_id = array.strip().split(";")[0]
    group = cluster.run("sbatch", "--parsable", f"--dependency=afterok:{array_id}", *small,
                        str(CONTAINERS / "slurm_group.sh"), cwd=workdir, env=env)
    return array_id, group.strip().split(";")[0]


def _expected_means(data: np.ndarray, mask: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    ids = [i for i in np.unique(labels[mask]) if i > 0]
    return pd.DataFrame({i: data[(labels == i) & mask].mean(axis=0) for i in ids})


def test_participant_array_then_dependent_group_job(cluster, dataset, tmp_path):
    out = tmp_path / "out"
    array_id, group_id = _submit(cluster, dataset, out, tmp_path)
    cluster.wait([array_id, group_id], JOBS_TIMEOUT)

    jobs = cluster.jobcomp()
    tasks = {j["ArrayTaskId"]: j for j in jobs if j.get("ArrayJobId") == array_id}
    (group,) = [j for j in jobs if j["JobId"] == group_id]
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("bids_fmristore_*.log")))
    assert sorted(tasks) == ["0", "1", "2", "3"], f"{jobs}\n{logs}"
    for job in [*tasks.values(), group]:
        assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), f"{job}\n{logs}"
    # afterok: the group job started only once every task had ended
    assert group["StartTime"] >= max(t["EndTime"] for t in tasks.values())

    # one log per task (the script's --output pattern), each task its own participant
    for task, sub in enumerate(SUBJECTS):
        log = (tmp_path / f"bids_fmristore_{array_id}_{task}.log").read_text()
        assert f"task {task}: sub-{sub} on " in log, log
    assert (tmp_path / f"bids_fmristore_group_{group_id}.log").exists()
    assert not list((tmp_path / "scratch").iterdir())  # work dirs removed by the trap

    labels = dataset["labels"]
    for sub in SUBJECTS:
        data, mask = dataset["runs"][sub]
        func = out / f"sub-{sub}" / "func"
        h5 = func / f"sub-{sub}_space-{SPACE}_atlas-A_bold.h5"
        maps = func / f"sub-{sub}_space-{SPACE}_desc-voxelstats_bold.h5"
        assert sorted(func.iterdir()) == sorted(
            [h5, h5.with_suffix(".json"), maps, maps.with_suffix(".json")])
        assert json.loads(h5.with_suffix(".json").read_text())["FailedRuns"] == []
        with bids_fmristore.open(h5) as f:
            (scan,) = f.scan_names
            assert scan == f"sub-{sub}_task-rest_run-01"
            assert f.n_voxels == np.count_nonzero(mask & (labels > 0))
            expected = _expected_means(data, mask, labels)
            got = f.summary(scan)
            assert list(got.columns) == list(expected.columns)
            np.testing.assert_allclose(got.to_numpy(), expected.to_numpy(), rtol=1e-6)

    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["BIDSVersion"]
    assert description["GeneratedBy"][0]["Name"] == "bids_fmristore"
    assert description["GeneratedBy"][0]["Version"] == bids_fmristore.__version__
    # no temporary left by four writers sharing OUTPUT_DIR
    assert not [p for p in out.rglob("*") if p.suffix in (".tmp", ".part")
                or (p.name.startswith(".") and p.name != ".dataset_description.lock")]

    in_all = np.logical_and.reduce([m for _, m in dataset["runs"].values()])
    for stat in ("mean", "std", "tsnr"):
        path = out / "group" / f"space-{SPACE}_stat-{stat}_bold.h5"
        with LabeledVolumeSet(path) as g:
            assert g.labels == [f"sub-{s}" for s in SUBJECTS]
            assert np.array_equal(g.mask, in_all)  # default threshold 1: inside every mask
            for sub in SUBJECTS:
                data = dataset["runs"][sub][0].astype(np.float64)[in_all]
                mean, std = data.mean(axis=-1), data.std(axis=-1)  # fMRIPrep's tSNR: ddof 0
                expected = {"mean": mean, "std": std, "tsnr": mean / std}[stat]
                np.testing.assert_allclose(g.volume(f"sub-{sub}")[in_all], expected,
                                           rtol=1e-5)
        rows = pd.read_csv(path.with_suffix(".tsv"), sep="\t")
        assert rows["participant_id"].tolist() == [f"sub-{s}" for s in SUBJECTS]


def test_failed_task_holds_the_group_job(cluster, dataset, tmp_path):
    """A task past the last participant fails (exit 2, one line); afterok never releases."""
    out = tmp_path / "out"
    env = {"BIDS_DIR": str(dataset["bids"]), "OUTPUT_DIR": str(out),
           "ATLAS": f"A={dataset['atlas']}", "BIDS_FMRISTORE_CMD": "false"}
    array = cluster.run("sbatch", "--parsable", "--array=4", "--cpus-per-task=1", "--mem=64M",
                        str(CONTAINERS / "slurm_participant_array.sh"), cwd=tmp_path, env=env)
    array_id = array.strip().split(";")[0]
    group = cluster.run("sbatch", "--parsable", f"--dependency=afterok:{array_id}",
                        "--mem=64M", str(CONTAINERS / "slurm_group.sh"), cwd=tmp_path, env=env)
    group_id = group.strip().split(";")[0]
    deadline = time.monotonic() + START_TIMEOUT
    reason = ""
    while time.monotonic() < deadline and reason != "DependencyNeverSatisfied":
        reason = cluster.run("squeue", "-h", "-j", group_id, "-o", "%r").strip()
        time.sleep(0.25)
    cluster.run("scancel", group_id)
    assert reason == "DependencyNeverSatisfied", cluster.logs()
    (task,) = [j for j in cluster.jobcomp() if j.get("ArrayJobId") == array_id]
    assert (task["JobState"], task["ExitCode"]) == ("FAILED", "2:0")
    log = (tmp_path / f"bids_fmristore_{array_id}_4.log").read_text()
    assert log.strip() == f"no participant in row 5 of {dataset['bids']}/participants.tsv"
    assert not out.exists()

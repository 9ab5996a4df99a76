"""A real single-node SLURM cluster for tests: munged, slurmctld and slurmd from Debian's packages, as root,
without systemd, everything (config, state, logs, munge key and socket) under one temporary folder.

`.ci/run` installs the packages (`slurmctld slurmd slurm-client munge`). Used by tests/test_slurm.py as a
fixture; also runnable by hand: `python tests/slurm_cluster.py /tmp/herd_slurm` brings one up and prints the
`SLURM_CONF` to export (stop it with `kill $(cat /tmp/herd_slurm/*.pid)`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sinfo", "sbatch", "srun", "squeue")


def unavailable() -> str | None:
    """Why a cluster cannot start here (None when it can)."""
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if missing:
        return f"SLURM/munge programs not installed ({', '.join(missing)}); .ci/run installs them with apt-get"
    if os.geteuid() != 0:
        return "the test cluster runs its daemons as root (SlurmUser=root), and this process is not root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def start(root: Path, timeout_s: float = 60.0) -> dict[str, str]:
    """Brings the cluster up under `root`; returns the environment variables its clients need."""
    root.mkdir(parents=True, exist_ok=True)
    for d in ("state", "spool", "log", "munge"):
        (root / d).mkdir(exist_ok=True)
    (root / "munge").chmod(0o755)  # munged wants the socket's folder traversable
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    sock = root / "munge" / "munge.sock"
    subprocess.run([_binary("munged"), "--force", f"--key-file={key}", f"--socket={sock}",
                    f"--pid-file={root / 'munged.pid'}", f"--log-file={root / 'log' / 'munged.log'}",
                    f"--seed-file={root / 'munge' / 'seed'}"], check=True, capture_output=True)
    host = socket.gethostname().split(".")[0]
    cpus = len(os.sched_getaffinity(0))
    mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=herdtest
SlurmctldHost={host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={root / 'log' / 'slurmctld.log'}
SlurmdLogFile={root / 'log' / 'slurmd.log'}
SlurmUser=root
SlurmdUser=root
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
KillWait=10
MinJobAge=300
NodeName={host} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    env = {"SLURM_CONF": str(conf)}
    full = {**os.environ, **env}
    subprocess.run([_binary("slurmctld"), "-c", "-f", str(conf)], check=True, env=full, capture_output=True)
    subprocess.run([_binary("slurmd"), "-f", str(conf)], check=True, env=full, capture_output=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=full, capture_output=True, text=True).stdout.strip()
        if state == "idle":
            return env
        time.sleep(0.5)
    stop(root)
    raise RuntimeError(f"the test SLURM node did not become idle in {timeout_s:.0f} s; logs in {root / 'log'}")


def stop(root: Path) -> None:
    """Stops the daemons started by `start(root)`."""
    for name in ("slurmd", "slurmctld", "munged"):
        pid_file = root / f"{name}.pid"
        try:
            os.kill(int(pid_file.read_text().strip()), 15)
        except (OSError, ValueError):
            pass


if __name__ == "__main__":
    if why := unavailable():
        sys.exit(why)
    print(f"export SLURM_CONF={start(Path(sys.argv[1]))['SLURM_CONF']}")

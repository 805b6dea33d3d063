"""Real services for the tests and benchmarks, from Debian's packages: an Orthanc PACS and a
PostgreSQL cluster, each started in a temporary folder on free loopback ports and stopped
afterwards (``apt-get install orthanc postgresql``; ``.ci/run`` installs both)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

STARTUP_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(check, what: str, process: subprocess.Popen | None, log: Path | None) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            break
        if check():
            return
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} did not start within {STARTUP_TIMEOUT_S:.0f} s\n{tail}")


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


class Orthanc:
    """A running Orthanc: ``rest`` (its REST API's base URL), ``dicom_port``, ``ae_title``."""

    def __init__(self, folder: Path, ae_title: str = "ORTHANC"):
        self.folder, self.ae_title = folder, ae_title
        self.http_port, self.dicom_port = free_port(), free_port()
        self.rest = f"http://127.0.0.1:{self.http_port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> Orthanc:
        executable = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        if not os.access(executable, os.X_OK):
            raise RuntimeError("Orthanc is not installed (apt-get install orthanc)")
        storage = self.folder / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "cxr-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.ae_title,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            # A report sent twice (a listener restarted mid-send) is kept once.
            "OverwriteInstances": False,
            "Plugins": [],
            "StableAge": 1,
        }
        (self.folder / "orthanc.json").write_text(json.dumps(config))
        log = self.folder / "orthanc.log"
        with log.open("wb") as handle:
            self.process = subprocess.Popen(
                [executable, str(self.folder / "orthanc.json")],
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=self.folder,
            )
        _wait_for(self._ready, "Orthanc", self.process, log)
        return self

    def _ready(self) -> bool:
        import httpx

        try:
            return httpx.get(f"{self.rest}/system", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def get(self, path: str, **params):
        import httpx

        response = httpx.get(f"{self.rest}{path}", params=params, timeout=30)
        response.raise_for_status()
        return (
            response.json()
            if "json" in response.headers.get("content-type", "")
            else (response.content)
        )

    def instances(self, modality: str | None = None) -> list[dict]:
        """Every stored instance's main tags (and its series' modality), via /tools/find."""
        import httpx

        query = {"Level": "Instance", "Query": {}, "Expand": True}
        if modality:
            query["Query"]["Modality"] = modality
        response = httpx.post(f"{self.rest}/tools/find", json=query, timeout=60)
        response.raise_for_status()
        return response.json()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)


@contextmanager
def running_orthanc(folder: str | os.PathLike):
    orthanc = Orthanc(Path(folder))
    try:
        yield orthanc.start()
    finally:
        orthanc.stop()


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
    return Path(found[-1]).parent


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the ``postgres`` user."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@contextmanager
def running_postgres():
    """A temporary PostgreSQL cluster on a loopback port; yields its SQLAlchemy URL.

    Its folder is made in the system's temporary folder (not under a test's, which the
    ``postgres`` user could not enter) and removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="cxr-postgres-"))
    try:
        if os.geteuid() == 0:
            shutil.chown(folder, "postgres", "postgres")
        binaries, data, port = _postgres_bin(), folder / "data", free_port()
        log = folder / "postgres.log"
        _run_postgres([str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"])
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        _run_postgres(
            [str(binaries / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "start"]
        )
        try:
            _wait_for(lambda: _port_open(port), "PostgreSQL", None, log)
            yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
        finally:
            _run_postgres([str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"])
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run_postgres(command: list[str]) -> None:
    result = subprocess.run(
        _as_postgres(command), capture_output=True, text=True, timeout=STARTUP_TIMEOUT_S
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{Path(command[0]).name} failed ({result.returncode}): "
            f"{(result.stderr or result.stdout)[-2000:]}"
        )

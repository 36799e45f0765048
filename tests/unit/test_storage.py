"""segrl.storage against a local folder and a real SeaweedFS S3 server (no mocks).

Most cases take the ``store`` fixture, which is parametrized over both backends,
so local and S3 must behave the same.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.fs as pafs
import pytest
from _seaweed import ACCESS_KEY, SECRET_KEY, free_ports, start_seaweed

from segrl.storage import (
    ArtifactStore,
    BucketNotFoundError,
    ObjectNotFoundError,
    StoreError,
    StoreUnreachableError,
    filesystem_for,
    open_store,
    read_uri_bytes,
    retry_unreachable,
    sdk_attempts,
)


def raw_names(store: ArtifactStore) -> list[str]:
    """Every name under the root as the filesystem sees it, hidden temp names included."""
    selector = pafs.FileSelector(store.fs_path(), recursive=True, allow_not_found=True)
    return [info.path.rsplit("/", 1)[-1] for info in store.filesystem.get_file_info(selector)]


def sample_table() -> pa.Table:
    return pa.table({"id": [1, 2, 3], "name": ["a", "b", "ç"], "score": [0.5, None, 1.5]})


# --------------------------------------------------------------------------- round trips


def test_bytes_and_text_round_trip(store):
    store.write_bytes("a/b/blob.bin", b"\x00\x01binary")
    store.write_bytes("empty.bin", b"")
    store.write_text("notes/readme.txt", "héllo\nworld")
    assert store.read_bytes("a/b/blob.bin") == b"\x00\x01binary"
    assert store.read_bytes("empty.bin") == b""
    assert store.read_text("notes/readme.txt") == "héllo\nworld"


def test_overwrite_replaces_content(store):
    store.write_text("k.txt", "first version, longer")
    store.write_text("k.txt", "second")
    assert store.read_text("k.txt") == "second"


def test_json_and_yaml_round_trip(store):
    obj = {"name": "run-1", "lr": 0.01, "layers": [1, 2, 3], "nested": {"ok": True, "none": None}}
    store.write_json("m/metrics.json", obj)
    store.write_yaml("config.yaml", obj)
    assert store.read_json("m/metrics.json") == obj
    assert store.read_yaml("config.yaml") == obj
    assert list(store.read_yaml("config.yaml")) == list(obj)  # key order kept


def test_table_round_trip(store):
    store.write_table("tables/t.parquet", sample_table())
    assert store.read_table("tables/t.parquet").equals(sample_table())


def test_file_round_trip_large(store, tmp_path):
    data = os.urandom(12 * 1024 * 1024 + 17)  # above the S3 multipart part size
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    store.upload_file(src, "files/big.bin")
    dest = tmp_path / "out" / "deep" / "big.bin"
    store.download_file("files/big.bin", dest)
    assert dest.read_bytes() == data


def test_dir_round_trip(store, tmp_path):
    src = tmp_path / "ckpt"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "model.pt").write_bytes(b"weights")
    (src / "sub" / "opt.pt").write_bytes(b"optimizer")
    (src / "sub" / "deeper" / "meta.json").write_text("{}")
    store.upload_dir(src, "train/ckpt_1")
    assert store.list("train/ckpt_1", recursive=True) == [
        "train/ckpt_1/model.pt",
        "train/ckpt_1/sub/deeper/meta.json",
        "train/ckpt_1/sub/opt.pt",
    ]
    out = tmp_path / "restored"
    store.download_dir("train/ckpt_1", out)
    assert (out / "model.pt").read_bytes() == b"weights"
    assert (out / "sub" / "opt.pt").read_bytes() == b"optimizer"
    assert (out / "sub" / "deeper" / "meta.json").read_text() == "{}"


def test_compressed_looking_keys_are_stored_verbatim(store, tmp_path):
    # pyarrow streams guess compression from the extension unless told not to.
    payload = b"not really gzip \x00\xff"
    store.write_bytes("data/x.gz", payload)
    store.write_bytes("data/y.bz2", payload)
    assert store.read_bytes("data/x.gz") == payload
    assert store.read_bytes("data/y.bz2") == payload
    assert read_uri_bytes(store.uri("data/x.gz"), store.endpoint_url) == payload
    store.download_file("data/x.gz", tmp_path / "x.gz")
    assert (tmp_path / "x.gz").read_bytes() == payload
    fs, path = filesystem_for(store.uri("data/x.gz"), store.endpoint_url)
    assert fs.get_file_info(path).size == len(payload)


def test_open_output_and_open_input_stream(store):
    with store.open_output("stream.bin") as f:
        for i in range(3):
            f.write(bytes([i]) * 1000)
    with store.open_input("stream.bin") as f:
        f.seek(1000)
        assert f.read(3) == b"\x01\x01\x01"


# --------------------------------------------------------------------------- queries


def test_list_exists_and_delete(store):
    for key in ("a.txt", "dir/b.txt", "dir/sub/c.txt", "other/d.txt"):
        store.write_text(key, key)
    assert store.list() == ["a.txt", "dir", "other"]
    assert store.list("dir") == ["dir/b.txt", "dir/sub"]
    assert store.list(recursive=True) == ["a.txt", "dir/b.txt", "dir/sub/c.txt", "other/d.txt"]
    assert store.list("dir", recursive=True) == ["dir/b.txt", "dir/sub/c.txt"]
    assert store.list("missing") == []
    assert store.list("a.txt") == []

    assert store.exists("a.txt") and store.exists("dir") and store.exists("dir/sub/c.txt")
    assert not store.exists("nope.txt") and not store.exists("dir/nope")

    store.delete("a.txt")
    store.delete("dir")
    store.delete("never-existed")
    store.delete("dir/never-existed")
    assert not store.exists("a.txt") and not store.exists("dir/b.txt")
    assert store.list(recursive=True) == ["other/d.txt"]


def test_list_hides_leftover_temp_objects(store):
    store.write_text("keep.txt", "x")
    # A writer killed between upload and rename leaves a hidden temp object behind.
    with store.filesystem.open_output_stream(f"{store.fs_path()}/.tmp-deadbeef-keep.txt") as f:
        f.write(b"partial")
    assert store.list() == ["keep.txt"]
    assert store.list(recursive=True) == ["keep.txt"]


def test_child_store_shares_objects_with_parent(store):
    child = store.child("runs/exp1")
    child.write_json("metrics.json", {"miou": 0.5})
    assert store.read_json("runs/exp1/metrics.json") == {"miou": 0.5}
    assert child.uri("metrics.json") == store.uri("runs/exp1/metrics.json")
    assert child.fs_path() == store.fs_path("runs/exp1")
    assert child.filesystem is store.filesystem
    assert child.list() == ["metrics.json"]


def test_uri_fs_path_and_root(store_root, make_store):
    store = make_store(store_root)
    if store_root.startswith("s3://"):
        assert store.root == store_root
        assert store.uri("a/b.txt") == f"{store_root}/a/b.txt"
        assert store.fs_path("a/b.txt") == f"{store_root[len('s3://') :]}/a/b.txt"
        assert isinstance(store.filesystem, pafs.S3FileSystem)
    else:
        assert store.root == os.path.abspath(store_root)
        assert store.uri("a/b.txt") == store.fs_path("a/b.txt") == f"{store.root}/a/b.txt"
        assert isinstance(store.filesystem, pafs.LocalFileSystem)
    assert store.uri() == store.root
    assert store.uri("a//./b.txt/") == store.uri("a/b.txt")


def test_store_survives_pickling(store):
    store.write_text("p.txt", "pickled")
    clone = pickle.loads(pickle.dumps(store))
    assert clone.root == store.root and clone.read_text("p.txt") == "pickled"


def test_open_store_is_artifact_store(store_root, make_store):
    kwargs = {"endpoint_url": make_store(store_root).endpoint_url} if "s3://" in store_root else {}
    opened = open_store(store_root, **kwargs)
    assert isinstance(opened, ArtifactStore)
    opened.write_text("x", "y")
    assert make_store(store_root).read_text("x") == "y"


# --------------------------------------------------------------------------- atomicity


class Boom(RuntimeError):
    """Raised on purpose in the middle of a write."""


def _interrupt_stream(store, key):
    with store.open_output(key) as f:
        f.write(b"new half " * 200_000)  # ~1.8 MB already sent before the failure
        raise Boom("writer died mid-way")


def _interrupt_table(store, key):
    # Parquet cannot store this type: serialization raises after the output was opened.
    bad = pa.table({"i": pa.array([pa.MonthDayNano([1, 2, 3])], pa.month_day_nano_interval())})
    store.write_table(key, bad)


def _interrupt_upload(store, key):
    # Opening succeeds but reading fails with EIO: a source that breaks during the copy.
    store.upload_file("/proc/self/mem", key)


def _interrupt_json(store, key):
    store.write_json(key, {"ok": 1, "bad": object()})


def _interrupt_keyboard(store, key):
    with store.open_output(key) as f:
        f.write(b"partial")
        raise KeyboardInterrupt


INTERRUPTIONS = {
    "stream": (_interrupt_stream, Boom),
    "table": (_interrupt_table, pa.ArrowNotImplementedError),
    "upload_file": (_interrupt_upload, StoreError),
    "json": (_interrupt_json, TypeError),
    "keyboard": (_interrupt_keyboard, KeyboardInterrupt),
}


@pytest.mark.parametrize("kind", list(INTERRUPTIONS))
def test_interrupted_write_publishes_nothing(store, kind):
    interrupt, error = INTERRUPTIONS[kind]
    with pytest.raises(error):
        interrupt(store, "fresh/obj")
    assert not store.exists("fresh/obj")
    assert not any(n.startswith(".tmp-") for n in raw_names(store))


@pytest.mark.parametrize("kind", list(INTERRUPTIONS))
def test_interrupted_write_keeps_previous_version(store, kind):
    store.write_bytes("obj", b"previous version")
    interrupt, error = INTERRUPTIONS[kind]
    with pytest.raises(error):
        interrupt(store, "obj")
    assert store.read_bytes("obj") == b"previous version"
    assert store.list() == ["obj"]
    assert not any(n.startswith(".tmp-") for n in raw_names(store))


def test_interrupted_upload_dir_leaves_only_whole_files(store, tmp_path):
    src = tmp_path / "d"
    src.mkdir()
    (src / "a.bin").write_bytes(b"aaa")
    os.symlink("/proc/self/mem", src / "b.bin")  # unreadable mid-copy
    (src / "c.bin").write_bytes(b"ccc")
    with pytest.raises(StoreError, match="b.bin"):
        store.upload_dir(src, "d")
    assert store.list("d", recursive=True) == ["d/a.bin"]  # written files are complete
    assert store.read_bytes("d/a.bin") == b"aaa"


def test_readers_only_ever_see_whole_versions(store):
    versions = [bytes([i]) * (1024 * 1024) for i in range(4)]
    store.write_bytes("hot.bin", versions[0])
    seen: list[bytes] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            seen.append(store.read_bytes("hot.bin"))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for v in versions[1:] * 2:
            store.write_bytes("hot.bin", v)
    finally:
        done.set()
        thread.join()
    assert seen and all(s in versions for s in seen)


# --------------------------------------------------------------------------- errors


def test_missing_key_error_names_uri(store, tmp_path):
    uri = store.uri("no/such.json")
    for read in (
        store.read_bytes,
        store.read_text,
        store.read_json,
        store.read_yaml,
        store.read_table,
    ):
        with pytest.raises(ObjectNotFoundError, match=uri) as info:
            read("no/such.json")
        assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(ObjectNotFoundError, match=uri):
        store.download_file("no/such.json", tmp_path / "x")
    with pytest.raises(ObjectNotFoundError, match=store.uri("no/dir")):
        store.download_dir("no/dir", tmp_path / "y")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("key", ["..", "../x", "a/../../x", "a/../b", "/abs/key", ".tmp-x/y"])
def test_bad_keys_rejected(store, key):
    with pytest.raises(StoreError, match="key"):
        store.write_text(key, "x")
    with pytest.raises(StoreError):
        store.read_text(key)
    with pytest.raises(StoreError):
        store.child(key)
    with pytest.raises(StoreError):
        store.exists(key)


def test_empty_key_rejected_for_objects(store):
    with pytest.raises(StoreError, match="non-empty key"):
        store.write_text("", "x")
    with pytest.raises(StoreError, match="non-empty key"):
        store.delete("")


def test_missing_upload_source_names_local_path(store, tmp_path):
    with pytest.raises(ObjectNotFoundError, match="nothing.bin"):
        store.upload_file(tmp_path / "nothing.bin", "x")
    with pytest.raises(ObjectNotFoundError, match="no-dir"):
        store.upload_dir(tmp_path / "no-dir", "x")


def test_unreachable_endpoint_fails_fast_and_names_it(s3_server):
    (port,) = free_ports(1)  # nothing listens here
    endpoint = f"http://127.0.0.1:{port}"
    store = ArtifactStore("s3://bucket/prefix", endpoint_url=endpoint, retry_seconds=0)  # no waiting out
    ops = {
        "read": lambda: store.read_bytes("k"),
        "write": lambda: store.write_bytes("k", b"v"),
        "list": lambda: store.list(),
        "exists": lambda: store.exists("k"),
    }

    def timed(op) -> tuple[BaseException | None, float]:
        start = time.monotonic()
        try:
            op()
        except BaseException as exc:  # inspected below
            return exc, time.monotonic() - start
        return None, time.monotonic() - start

    with ThreadPoolExecutor(len(ops)) as pool:  # in parallel: each one waits out its retries
        results = dict(zip(ops, pool.map(timed, ops.values()), strict=True))
    for name, (exc, seconds) in results.items():
        assert isinstance(exc, StoreUnreachableError), (name, exc)
        assert endpoint in str(exc), (name, exc)
        assert seconds < 30, (name, seconds)


def test_missing_bucket_is_named(s3_server):
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    store = ArtifactStore(f"s3://{bucket}/p", endpoint_url=s3_server.endpoint_url)
    with pytest.raises(BucketNotFoundError, match=bucket):
        store.write_text("k.txt", "v")
    with pytest.raises(BucketNotFoundError, match=bucket):
        store.read_text("k.txt")
    with pytest.raises(BucketNotFoundError, match=bucket):
        store.list()
    with pytest.raises(BucketNotFoundError, match=bucket):
        store.exists("k.txt")


def test_bad_credentials_error_hides_secret(s3_server, monkeypatch):
    wrong = "wrong-secret-value-Xy7"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    store = ArtifactStore(s3_server.root("creds"), endpoint_url=s3_server.endpoint_url)
    with pytest.raises(StoreError) as info:
        store.write_text("k.txt", "v")
    text = f"{info.value} {info.value!r} {store!r} {store.filesystem!r}"
    assert s3_server.endpoint_url in str(info.value)
    assert wrong not in text and SECRET_KEY not in text
    assert wrong not in repr(pickle.dumps(store))


def test_repr_has_no_secrets(store):
    text = repr(store)
    assert store.root in text
    assert SECRET_KEY not in text


def test_invalid_endpoint_and_scheme_rejected():
    with pytest.raises(StoreError, match="endpoint"):
        ArtifactStore("s3://b/p", endpoint_url="127.0.0.1:9000")
    with pytest.raises(StoreError, match="gs"):
        filesystem_for("gs://bucket/key")
    with pytest.raises(StoreError, match="bucket"):
        ArtifactStore("s3://")


# --------------------------------------------------------------------------- retries


class FlakyProxy:
    """TCP proxy to the S3 server that answers its first ``failures`` connections with 503."""

    def __init__(self, target_port: int, failures: int):
        self.target_port = target_port
        self.failures_left = failures
        self.rejected = 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def close(self) -> None:
        self.server.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            if self.failures_left > 0:
                self.failures_left -= 1
                self._reject(conn)
            else:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
                for a, b in ((conn, upstream), (upstream, conn)):
                    threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _reject(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(65536)
            if not chunk:
                break
            head += chunk
        body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
        conn.sendall(
            b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )
        self.rejected += 1
        conn.close()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def test_transient_503s_are_retried(s3_server):
    target_port = int(s3_server.endpoint_url.rsplit(":", 1)[1])
    for op in ("write", "read"):
        # A fresh proxy (so a fresh endpoint and connection pool) per operation.
        proxy = FlakyProxy(target_port, failures=2)
        try:
            endpoint = f"http://127.0.0.1:{proxy.port}"
            store = ArtifactStore(s3_server.root("flaky"), endpoint_url=endpoint)
            if op == "write":
                store.write_text("k.txt", "survived throttling")
            else:
                assert store.read_text("k.txt") == "survived throttling"
            assert proxy.rejected == 2, op
        finally:
            proxy.close()


# --------------------------------------------------------------------------- module helpers


def test_filesystem_for_local(tmp_path):
    fs, path = filesystem_for(str(tmp_path / "a.txt"))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "a.txt")
    fs, path = filesystem_for(f"file://{tmp_path}/a.txt")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "a.txt")
    fs, path = filesystem_for("relative/x.txt")
    assert path == os.path.abspath("relative/x.txt")


def test_filesystem_for_s3(s3_server):
    store = ArtifactStore(s3_server.root("fsfor"), endpoint_url=s3_server.endpoint_url)
    store.write_text("x.txt", "via store")
    fs, path = filesystem_for(store.uri("x.txt"), s3_server.endpoint_url)
    assert isinstance(fs, pafs.S3FileSystem)
    assert path == f"{s3_server.bucket}/fsfor/x.txt"
    assert fs is store.filesystem  # cached per endpoint and region
    with fs.open_input_stream(path) as f:
        assert f.read() == b"via store"


def test_endpoint_from_environment(s3_env):
    store = ArtifactStore(s3_env.root("envtest"))
    assert store.endpoint_url == s3_env.endpoint_url
    store.write_text("e.txt", "env endpoint")
    fs, path = filesystem_for(store.uri("e.txt"))
    with fs.open_input_stream(path) as f:
        assert f.read() == b"env endpoint"


def test_read_uri_bytes(store_root, make_store, tmp_path):
    store = make_store(store_root)
    store.write_bytes("img/0.png", b"\x89PNG fake")
    endpoint = store.endpoint_url
    assert read_uri_bytes(store.uri("img/0.png"), endpoint) == b"\x89PNG fake"
    if not store.is_s3:
        assert read_uri_bytes(f"file://{store.uri('img/0.png')}") == b"\x89PNG fake"
    missing = store.uri("img/404.png")
    with pytest.raises(ObjectNotFoundError, match=missing):
        read_uri_bytes(missing, endpoint)


# --------------------------------------------------------------------------- outages


def test_an_unreachable_endpoint_is_tried_again_with_backoff_for_the_budget_then_named(caplog):
    clock, waits = [0.0], []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        clock[0] += seconds

    def down() -> None:
        raise StoreUnreachableError("S3 endpoint http://127.0.0.1:9 is unreachable (writing s3://b/k)")

    with caplog.at_level(logging.WARNING, logger="segrl.storage"), \
            pytest.raises(StoreUnreachableError, match=r"127.0.0.1:9 .*tried again for 20 s: store.retry_seconds"):
        retry_unreachable(down, 20, sleep=sleep, clock=lambda: clock[0])
    assert waits[:5] == [0.5, 1.0, 2.0, 4.0, 8.0] and max(waits) == 8.0  # doubling, capped
    assert sum(waits) == 20
    assert caplog.text.count("[segrl] store unreachable, retrying for up to 20 s") == 1  # once per outage
    answers = iter([StoreUnreachableError("down"), StoreUnreachableError("down"), "done"])

    def flaky() -> str:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert retry_unreachable(flaky, 20, sleep=sleep, clock=lambda: clock[0]) == "done"
    assert sdk_attempts(180) > sdk_attempts(0) == 4  # Ray's filesystem: the SDK retries about as long


def test_a_write_during_a_short_outage_completes_and_a_tiny_budget_fails_naming_it(tmp_path, monkeypatch, caplog):
    """The real server stopped for 9 s mid-write and restarted: with store.retry_seconds=30 the
    write waits it out and lands whole; with 1 s it fails naming the endpoint and the budget, and
    nothing is written.

    9 s: longer than the AWS SDK's own retries of one request (4 attempts wait a random
    0..1, 0..2 and 0..4 s, at most 7 s), so the outage always reaches segrl's retry, which
    says so; a 5 s outage was sometimes waited out inside the SDK, silently."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    server = start_seaweed(tmp_path / "weed")  # its own: stopping the session's would fail other tests
    try:
        store = ArtifactStore(server.root("outage"), endpoint_url=server.endpoint_url, retry_seconds=30)
        store.write_bytes("before.bin", b"up")
        server.stop()
        outage = threading.Timer(9, server.restart)
        outage.start()
        started = time.monotonic()
        payload = os.urandom(3 * 1024 * 1024)
        with caplog.at_level(logging.WARNING, logger="segrl.storage"):
            store.write_bytes("during.bin", payload)
        waited = time.monotonic() - started
        outage.join()
        assert waited >= 8.5
        assert store.read_bytes("during.bin") == payload
        assert "[segrl] store unreachable, retrying for up to 30 s" in caplog.text

        impatient = ArtifactStore(server.root("outage"), endpoint_url=server.endpoint_url, retry_seconds=1)
        server.stop()
        with pytest.raises(StoreUnreachableError) as info:
            impatient.write_bytes("lost.bin", b"never")
        assert server.endpoint_url in str(info.value) and "tried again for 1 s: store.retry_seconds" in str(info.value)
        server.restart()
        assert store.list() == ["before.bin", "during.bin"]  # nothing half-written, no temp object
    finally:
        server.stop()


def test_the_s3_filesystem_handed_to_ray_keeps_its_retries_when_pickled():
    """pyarrow's own pickle of an S3FileSystem drops its retry strategy and timeouts: Ray
    Train's controller and workers, which receive it pickled, would then give up on an outage
    after the SDK's default attempts."""
    import pickle

    from segrl.storage import _s3_filesystem

    fs = ArtifactStore("s3://bucket/run", endpoint_url="http://127.0.0.1:9", retry_seconds=120).ray_filesystem
    again = pickle.loads(pickle.dumps(fs))
    assert again.settings == fs.settings == ("http://127.0.0.1:9", "us-east-1", sdk_attempts(120))
    assert again is _s3_filesystem(*fs.settings)  # rebuilt from the settings (this process's cached one)

"""A whole Ray Train run on S3 that loses its store for 20 s (issue 18, item 9).

The run's own SeaweedFS server (the session's would fail other tests) is stopped once the run
has written its first checkpoint and started again 20 s later. With ``store.retry_seconds``
the run waits the outage out, says so in its log, and ends as an undisturbed run does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from _seaweed import ACCESS_KEY, SECRET_KEY, SeaweedServer, start_seaweed
from _tiny import tiny_overrides

from segrl.config import load_config
from segrl.engine.train import train, without_clock
from segrl.storage import open_store

pytestmark = pytest.mark.integration

TINY = tiny_overrides(32, 8, (48, 64), "train.epochs=4", "train.checkpoint_every_steps=2",
                      "train.keep_checkpoints=1")
STEPS = 4 * (32 // 2 // 4)  # 4 epochs of 2 workers x batch 4
OUTAGE_S = 20.0


@pytest.fixture(scope="module")
def s3_ray(shared_ray, tmp_path_factory) -> Iterator[tuple[object, SeaweedServer]]:
    """Ray started with the test credentials in its environment (Ray Train's workers read the
    store through the standard AWS chain, as in production), and a private S3 server."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        shared_ray.stop()  # a cluster started before these variables were set would not pass them on
        ray = shared_ray.get()
        server = start_seaweed(tmp_path_factory.mktemp("outage-weed"))
        try:
            yield ray, server
        finally:
            server.stop()
            shared_ray.stop()  # the next module starts one without these variables


def stop_after_first_checkpoint(server: SeaweedServer, root: str, events: dict) -> None:
    """Stop the server once the run's first checkpoint is in the store; start it OUTAGE_S later."""
    store = open_store(root, server.endpoint_url, retry_seconds=0)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if any(key.startswith("train/ckpt_") for key in store.list("train")):
                break
        except Exception as exc:
            events["error"] = f"{exc!r} poll={server.process.poll()} {server.log_tail()}"
            return
        time.sleep(0.1)
    else:
        events["error"] = "no checkpoint was written"
        return
    events["stopped"] = time.monotonic()
    server.stop()
    time.sleep(OUTAGE_S)
    server.restart()
    events["restarted"] = time.monotonic()


def test_a_training_run_waits_out_a_20_second_store_outage_and_ends_as_an_undisturbed_run(
        s3_ray, tmp_path):
    _, server = s3_ray
    endpoint = [f"store.endpoint_url={server.endpoint_url}", "store.retry_seconds=120"]
    root = server.root("runs")
    events: dict = {}
    outage = threading.Thread(target=stop_after_first_checkpoint,
                              args=(server, f"{root}/outage", events), daemon=True)
    outage.start()
    disturbed = train(load_config(overrides=[*TINY, *endpoint, f"store.root={root}", "name=outage"]))
    ended = time.monotonic()
    outage.join(timeout=OUTAGE_S + 90)
    print({k: (round(v - ended, 1) if isinstance(v, float) else v) for k, v in events.items()})
    assert "error" not in events, events
    assert events["restarted"] - events["stopped"] >= OUTAGE_S and events["restarted"] < ended  # mid-run
    undisturbed = train(load_config(overrides=[*TINY, f"store.root={tmp_path}", "name=calm"]))

    assert disturbed.metrics["step"] == undisturbed.metrics["step"] == STEPS
    # the outage changed nothing the run learned
    assert without_clock(disturbed.metrics["history"]) == without_clock(undisturbed.metrics["history"])
    store = open_store(f"{root}/outage", server.endpoint_url)
    assert [k for k in store.list("train") if k.startswith("train/ckpt_")] == [f"train/ckpt_{STEPS:08d}"]
    assert store.read_json("metrics.json")["val_miou"] == disturbed.metrics["val_miou"]

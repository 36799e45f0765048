"""The cluster path end to end: the local stack (Ray head with token auth + SeaweedFS),
`ray job submit` of a training job whose artifacts all land in S3, and token auth.
(Training over two nodes is in test_multinode.py.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
TINY = ["data.synthetic_train_images=16", "data.synthetic_val_images=4", "data.synthetic_size=[48,64]",
        "data.crop_size=[48,64]", "train.batch_size=4", "train.epochs=2", "train.log_every_steps=1000",
        "compute.cpus_per_worker=0.5", "compute.threads_per_worker=1"]


def exports_to_env(exports: str, base: dict[str, str]) -> dict[str, str]:
    """The environment after evaluating local_up.sh's export lines in a shell."""
    out = subprocess.run(["bash", "-c", f"{exports}\nenv -0"], env=base, capture_output=True,
                         check=True)
    pairs = (item.split("=", 1) for item in out.stdout.decode().split("\0") if "=" in item)
    return dict(pairs)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """One local stack for the module: starting and stopping it costs seconds of both cores."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
    # this interpreter's environment, activated or not: local_up.sh, `ray` and the job use it
    bin_dir = os.path.dirname(sys.executable)
    base.update(SEGRL_STACK_DIR=str(tmp_path_factory.mktemp("stack")), SEGRL_STACK_CPUS="2",
                SEGRL_STACK_BUCKET="segrl-ci", PYTHON=sys.executable,
                PATH=os.pathsep.join([bin_dir, base.get("PATH", "")]))
    up = subprocess.run(["bash", "cluster/local_up.sh"], cwd=REPO, env=base, capture_output=True,
                        text=True, timeout=300)
    assert up.returncode == 0, f"local_up.sh failed:\n{up.stderr[-3000:]}"
    try:
        yield exports_to_env(up.stdout, base)
    finally:
        down = subprocess.run(["bash", "cluster/local_down.sh"], cwd=REPO, env=base,
                              capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stderr


def test_submitted_training_job_writes_every_artifact_to_s3_and_no_secret_to_logs(stack):
    import boto3

    secret = stack["AWS_SECRET_ACCESS_KEY"]
    assert secret and stack["RAY_AUTH_MODE"] == "token"
    submit = subprocess.run(
        ["ray", "job", "submit", "--runtime-env", "cluster/runtime_env.yaml", "--",
         "python", "jobs/train.py", "name=stack_job", "compute.num_workers=2",
         "store.root=s3://segrl-ci/runs", *TINY],
        cwd=REPO, env=stack, capture_output=True, text=True, timeout=900,
    )
    transcript = submit.stdout + submit.stderr
    print(transcript[-4000:])
    assert submit.returncode == 0, transcript[-4000:]
    assert re.search(r"Job .raysubmit_\w+. succeeded", transcript)
    job_id = re.search(r"(raysubmit_\w+)", transcript).group(1)

    s3 = boto3.client("s3", endpoint_url=stack["AWS_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id=stack["AWS_ACCESS_KEY_ID"], aws_secret_access_key=secret)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="segrl-ci", Prefix="runs/")["Contents"]]
    print("\n".join(keys))
    assert "runs/stack_job/config.yaml" in keys and "runs/stack_job/metrics.json" in keys
    assert any(re.fullmatch(r"runs/stack_job/train/ckpt_\d{8}/checkpoint\.pt", k) for k in keys)
    metrics = json.loads(s3.get_object(Bucket="segrl-ci", Key="runs/stack_job/metrics.json")["Body"].read())
    assert metrics["epoch"] == 2

    # No credential in the job's logs, its metadata or the saved config.
    logs = subprocess.run(["ray", "job", "logs", job_id], cwd=REPO, env=stack, capture_output=True,
                          text=True, timeout=120).stdout
    status = subprocess.run(["ray", "job", "list"], cwd=REPO, env=stack, capture_output=True,
                            text=True, timeout=120).stdout
    config = s3.get_object(Bucket="segrl-ci", Key="runs/stack_job/config.yaml")["Body"].read().decode()
    for text in (transcript, logs, status, config):
        assert secret not in text

    # The stack's head has segrl's local-cluster Ray Train settings: the job's run started no
    # preemption watcher actor (the state API lists the run's actors, ended ones too)
    listing = subprocess.run(["ray", "list", "actors", "--format", "json", "--limit", "10000"], cwd=REPO,
                             env=stack, capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr[-2000:]
    classes = {actor["class_name"] for actor in json.loads(listing.stdout[listing.stdout.index("["):])}
    assert "RayTrainWorker" in classes and "PreemptionWatcher" not in classes, classes

    # A scoring job reads those checkpoints from S3 and writes its tables back to S3.
    score = subprocess.run(
        ["ray", "job", "submit", "--runtime-env", "cluster/runtime_env.yaml", "--",
         "python", "jobs/score_pool.py", "pool=synthetic://target?n=64&size=48x64",
         "checkpoints=s3://segrl-ci/runs/stack_job/train", "out=s3://segrl-ci/runs/stack_job/score",
         "regions_top_r=2"],
        cwd=REPO, env=stack, capture_output=True, text=True, timeout=600,
    )
    print(score.stdout[-2000:])
    assert score.returncode == 0, (score.stdout + score.stderr)[-4000:]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="segrl-ci", Prefix="runs/stack_job/score/")["Contents"]]
    for name in ("scores.parquet", "errors.parquet", "regions.parquet", "score_summary.json"):
        assert f"runs/stack_job/score/{name}" in keys
    assert secret not in score.stdout + score.stderr


def test_token_auth_refuses_a_client_without_the_token(stack):
    env = {k: v for k, v in stack.items() if k not in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")}
    env["HOME"] = stack.get("HOME", "/tmp")  # ~/.ray/auth_token of this user is not the stack's
    listing = subprocess.run(["ray", "job", "list"], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=120)
    assert listing.returncode != 0

"""The files under cluster/: they parse, name only what exists, keep secrets out, bind loopback.

Fast: no Ray, no servers. The shell scripts are syntax-checked; local_down.sh also runs
against a state dir whose recorded PIDs are plain sleeping processes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
EXPECTED = (
    "aws.yaml",
    "runtime_env.yaml",
    "kuberay/raycluster.yaml",
    "kuberay/rayjob.yaml",
    "local_up.sh",
    "local_down.sh",
)

# Named by cluster/kuberay/rayjob.yaml before they exist: lands with the loop issue.
UPCOMING: frozenset[str] = frozenset()  # files cluster/ may name before they exist

LOOP_ENTRYPOINT = "python jobs/stal_loop.py --config configs/camvid.yaml"
SECRET_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN")
LOOPBACK = "127.0.0.1"

REFERENCE_RE = re.compile(r"(?<![\w./-])((?:jobs|configs|cluster)/[\w./-]*\.(?:py|ya?ml|sh))\b")
JOB_COMMAND_RE = re.compile(r"python\s+(jobs/[\w./-]+\.py)\s+--config\s+(configs/[\w./-]+\.ya?ml)")


def cluster_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.is_file())


def yaml_files() -> list[Path]:
    return sorted(p for p in cluster_files() if p.suffix in (".yaml", ".yml"))


def shell_files() -> list[Path]:
    return sorted(CLUSTER.rglob("*.sh"))


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def load(name: str) -> list:
    return list(yaml.safe_load_all((CLUSTER / name).read_text()))


def code_lines(path: Path) -> list[str]:
    """Lines of a shell script that are not comments."""
    return [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]


# ------------------------------------------------------------------------ secret detection


def _walk(node: object) -> Iterator[object]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _embedded_yaml(node: object) -> Iterator[object]:
    """Runtime envs given as YAML strings (KubeRay's runtimeEnvYAML)."""
    for item in _walk(node):
        if isinstance(item, dict) and isinstance(item.get("runtimeEnvYAML"), str):
            yield yaml.safe_load(item["runtimeEnvYAML"])


def literal_secrets(text: str) -> list[str]:
    """Secret variables given a literal value anywhere in ``text`` (YAML or shell).

    Flags ``{name: AWS_SECRET_ACCESS_KEY, value: ...}`` env entries (block or flow style,
    also inside an embedded runtimeEnvYAML), ``AWS_SECRET_ACCESS_KEY: value`` mappings, and
    ``AWS_SECRET_ACCESS_KEY=value`` assignments whose value is not an expansion (``$...``) or
    a printf placeholder (``%q``).
    """
    found = []
    lines = text.splitlines()
    for i, line in enumerate(lines):  # the grep: a secret's name, then `value:` before its end
        if re.search(rf"name:\s*['\"]?({'|'.join(SECRET_NAMES)})\b", line):
            for j, follow in enumerate(lines[i : i + 4]):
                if re.search(r"\bvalue:", follow):
                    found.append(f"env value literal: {line.strip()} / {follow.strip()}")
                    break
                if "valueFrom" in follow or (j and "name:" in follow):
                    break
    for name in SECRET_NAMES:
        for match in re.finditer(rf"\b{name}['\"]?\s*[:=][ \t]*['\"]?([^\s'\"]*)", text):
            if match.group(1) and not match.group(1).startswith(("$", "%", "{", "}")):
                found.append(f"assignment: {match.group(0)}")
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError:
        docs = []  # a shell script
    for doc in docs + [e for d in docs for e in _embedded_yaml(d)]:
        for item in _walk(doc):
            if not isinstance(item, dict):
                continue
            if item.get("name") in SECRET_NAMES and "value" in item:
                found.append(f"env entry: {item['name']}")
            found += [f"mapping: {k}" for k in SECRET_NAMES if isinstance(item.get(k), str)]
    return found


@pytest.mark.parametrize(
    "text",
    [
        "env:\n  - name: AWS_SECRET_ACCESS_KEY\n    value: abcd1234\n",
        "env:\n  - name: AWS_SECRET_ACCESS_KEY\n    # rotated monthly\n    value: abcd1234\n",
        "env: [{name: AWS_SECRET_ACCESS_KEY, value: abcd1234}]\n",
        "env:\n  - name: RAY_AUTH_TOKEN\n    value: abcd1234\n",
        "spec:\n  runtimeEnvYAML: |\n    env_vars:\n      AWS_SECRET_ACCESS_KEY: abcd1234\n",
        "export AWS_SECRET_ACCESS_KEY=abcd1234\n",
    ],
)
def test_literal_secret_detector_flags_literals(text: str) -> None:
    assert literal_secrets(text)


@pytest.mark.parametrize(
    "text",
    [
        "env:\n  - name: AWS_SECRET_ACCESS_KEY\n    valueFrom:\n"
        "      secretKeyRef: {name: s3, key: AWS_SECRET_ACCESS_KEY}\n"
        "  - name: AWS_ENDPOINT_URL\n    value: https://s3.example.com\n",
        'env AWS_SECRET_ACCESS_KEY="$SECRET_KEY" weed mini\n',
        '--from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY"\n',
    ],
)
def test_literal_secret_detector_passes_references(text: str) -> None:
    assert literal_secrets(text) == []


# ------------------------------------------------------------------------ all files


def test_expected_files_exist() -> None:
    missing = [name for name in EXPECTED if not (CLUSTER / name).is_file()]
    assert not missing, f"missing under cluster/: {missing}"


@pytest.mark.parametrize("path", yaml_files(), ids=rel)
def test_yaml_parses(path: Path) -> None:
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(doc, dict) for doc in docs), f"{rel(path)}: not YAML mappings"


def test_referenced_jobs_configs_and_cluster_files_exist() -> None:
    referenced: dict[str, set[str]] = {}
    for path in cluster_files():
        for ref in REFERENCE_RE.findall(path.read_text()):
            referenced.setdefault(ref, set()).add(rel(path))
    missing = {
        ref: sorted(where)
        for ref, where in referenced.items()
        if ref not in UPCOMING and not (ROOT / ref).is_file()
    }
    assert not missing, f"files named in cluster/ that do not exist: {missing}"
    stale = UPCOMING - referenced.keys()
    assert not stale, f"UPCOMING lists files cluster/ no longer names: {sorted(stale)}"


def test_job_commands_name_a_job_and_its_config() -> None:
    commands = [
        (job, config)
        for path in cluster_files()
        for job, config in JOB_COMMAND_RE.findall(path.read_text())
    ]
    assert ("jobs/train.py", "configs/camvid_supervised.yaml") in commands
    for job, config in commands:
        for ref in (job, config):
            assert ref in UPCOMING or (ROOT / ref).is_file(), f"{ref} does not exist"


@pytest.mark.parametrize("path", cluster_files(), ids=rel)
def test_no_literal_secrets(path: Path) -> None:
    assert literal_secrets(path.read_text()) == [], rel(path)


@pytest.mark.parametrize("path", cluster_files(), ids=rel)
def test_nothing_binds_all_interfaces(path: Path) -> None:
    assert "0.0.0.0" not in path.read_text(), f"{rel(path)} names 0.0.0.0"


# ------------------------------------------------------------------------ cluster launcher


def test_aws_head_runs_no_work_and_workers_have_gpus() -> None:
    (cfg,) = load("aws.yaml")
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    gpu_types = [
        t
        for name, t in types.items()
        if name != cfg["head_node_type"] and t["resources"].get("GPU", 0) >= 1
    ]
    assert gpu_types, "no GPU worker node type"
    for t in gpu_types:
        assert 0 <= t["min_workers"] <= t["max_workers"] and t["max_workers"] >= 1
    assert cfg["idle_timeout_minutes"] > 0
    assert cfg["file_mounts"]["~/segrl"] == "."
    assert any("pip install -e ~/segrl" in c for c in cfg["setup_commands"])
    header = (CLUSTER / "aws.yaml").read_text()
    assert "ray up" in header and "ray job submit" in header


def test_aws_matches_rays_launcher_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    spec = importlib.util.find_spec("ray")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("ray is not installed")
    schema_path = Path(list(spec.submodule_search_locations)[0]) / "autoscaler/ray-schema.json"
    if not schema_path.is_file():
        pytest.skip("this ray has no autoscaler/ray-schema.json")
    (cfg,) = load("aws.yaml")
    jsonschema.validate(cfg, json.loads(schema_path.read_text()))


# ------------------------------------------------------------------------ KubeRay

KUBERAY = ("kuberay/raycluster.yaml", "kuberay/rayjob.yaml")


def ray_cluster_spec(name: str) -> dict:
    (doc,) = [d for d in load(name) if d.get("kind") in ("RayCluster", "RayJob")]
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def token_auth_configured(spec: dict) -> bool:
    """KubeRay's authOptions, or (before KubeRay 1.5.1) the env on every Ray container."""
    if spec.get("authOptions", {}).get("mode") == "token":
        return True
    for container in containers(spec):
        env = env_of(container)
        token = env.get("RAY_AUTH_TOKEN", {})
        if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
            return False
        if "secretKeyRef" not in token.get("valueFrom", {}):
            return False
    return True


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_token_auth(name: str) -> None:
    assert token_auth_configured(ray_cluster_spec(name))


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_head_runs_no_work_and_gpu_workers(name: str) -> None:
    spec = ray_cluster_spec(name)
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpus = [
        c["resources"]["limits"].get("nvidia.com/gpu")
        for g in spec["workerGroupSpecs"]
        for c in g["template"]["spec"]["containers"]
    ]
    assert 1 in gpus, "no worker group with nvidia.com/gpu: 1"


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_s3_credentials_come_from_a_secret(name: str) -> None:
    for container in containers(ray_cluster_spec(name)):
        env = env_of(container)
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "value" not in env[var], f"{container['name']}: {var} is a literal"
            assert "secretKeyRef" in env[var]["valueFrom"], f"{container['name']}: {var}"


def test_rayjob_runs_the_loop_with_a_clean_runtime_env() -> None:
    (job,) = load("kuberay/rayjob.yaml")
    assert job["kind"] == "RayJob"
    assert " ".join(job["spec"]["entrypoint"].split()).startswith(LOOP_ENTRYPOINT)
    text = (CLUSTER / "kuberay/rayjob.yaml").read_text()
    alternative = [ln for ln in text.splitlines() if ln.lstrip().startswith("#")]
    assert any(
        "python jobs/train.py --config configs/camvid_supervised.yaml" in ln for ln in alternative
    ), "the commented supervised entrypoint is missing"
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict)
    assert not set(runtime_env.get("env_vars", {})) & set(SECRET_NAMES)


# ------------------------------------------------------------------------ runtime env


def test_runtime_env_uploads_the_repo_without_runs_or_secrets() -> None:
    (env,) = load("runtime_env.yaml")
    assert env["working_dir"] == "."
    assert {"runs/", ".git", "benchmarks/results"} <= set(env["excludes"])
    assert not set(env.get("env_vars", {})) & set(SECRET_NAMES)


# ------------------------------------------------------------------------ local stack


@pytest.mark.parametrize("path", shell_files(), ids=rel)
def test_shell_script_syntax(path: Path) -> None:
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.access(path, os.X_OK), f"{rel(path)} is not executable"
    assert "set -euo pipefail" in code_lines(path)


def test_local_up_binds_only_loopback() -> None:
    binds = re.findall(
        r"(--node-ip-address|--dashboard-host|-ip|-ip\.bind)=(\S+)",
        "\n".join(code_lines(CLUSTER / "local_up.sh")),
    )
    assert {flag for flag, _ in binds} == {
        "--node-ip-address",
        "--dashboard-host",
        "-ip",
        "-ip.bind",
    }
    assert {value for _, value in binds} == {LOOPBACK}


def test_local_up_head_has_the_ray_train_settings_of_segrls_local_cluster() -> None:
    """The stack's head is a cluster of this machine alone too: its jobs' training runs poll
    and skip the preemption watcher as segrl's own local cluster does, unless the shell says."""
    from segrl.engine.train import LOCAL_CLUSTER_ENV

    script = "\n".join(code_lines(CLUSTER / "local_up.sh"))
    for name, value in LOCAL_CLUSTER_ENV.items():
        assert f'{name}="${{{name}:-{value}}}"' in script, f"local_up.sh does not default {name} to {value}"


def test_local_up_uses_the_weed_flags_the_tests_use() -> None:
    from _seaweed import _weed_command

    ports, admin = list(range(60001, 60009)), (60101, 60102)
    script = "\n".join(code_lines(CLUSTER / "local_up.sh"))
    for arg in _weed_command("weed", Path("data"), ports, admin)[2:]:
        flag, _, value = arg.partition("=")
        if flag == "-dir" or value.isdigit() and int(value) in {*ports, *admin}:
            assert f"{flag}=" in script, f"local_up.sh does not set {flag}"
        else:
            assert arg in script, f"local_up.sh lacks {arg}"


def test_local_down_stops_only_its_own_processes() -> None:
    assert not any(
        re.search(r"\bray stop\b|ray\.scripts\.scripts stop", ln)
        for ln in code_lines(CLUSTER / "local_down.sh")
    ), "`ray stop` stops every Ray cluster on the machine"


def _local_down(state: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SEGRL_STACK_DIR": str(state)}
    return subprocess.run(
        [str(CLUSTER / "local_down.sh")], env=env, capture_output=True, text=True, timeout=60
    )


def _sleeper(*marker: str) -> subprocess.Popen:
    """A process that sleeps, with ``marker`` on its command line."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", *marker])


@pytest.mark.skipif(sys.platform != "linux", reason="uses Linux ps")
def test_local_down_is_idempotent_and_signals_only_recorded_matching_pids(tmp_path: Path) -> None:
    state = tmp_path / "stack"
    assert _local_down(state).returncode == 0  # no state dir at all
    (state / "s3").mkdir(parents=True)
    assert _local_down(state).returncode == 0  # nothing recorded

    cksum = subprocess.run(
        ["bash", "-c", 'printf %s "$1" | cksum', "_", str(state.resolve())],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[0]
    ray_tmp = f"/tmp/segrl-ray-{os.getuid()}-{cksum}"  # as local_up.sh derives it
    stranger = _sleeper()  # a PID the state names but that is not the stack's: left alone
    weed = _sleeper(f"-dir={state.resolve()}/s3")
    ray = None
    try:
        (state / "ray.pid").write_text(str(stranger.pid))
        (state / "weed.pid").write_text(str(weed.pid))
        result = _local_down(state)
        assert result.returncode == 0, result.stderr
        assert weed.wait(timeout=10) == -signal.SIGTERM
        assert stranger.poll() is None, "local_down signalled a process that is not the stack's"
        assert not (state / "ray.pid").exists() and not (state / "weed.pid").exists()

        ray = _sleeper(f"--temp-dir={ray_tmp}")
        (state / "ray.pid").write_text(str(ray.pid))
        result = _local_down(state)
        assert result.returncode == 0, result.stderr
        assert ray.wait(timeout=10) == -signal.SIGTERM
        assert _local_down(state).returncode == 0  # and again: nothing left to do
    finally:
        for proc in (stranger, weed, ray):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)

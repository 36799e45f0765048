"""Fixtures shared by the integration tests.

One local 2-CPU Ray cluster serves every module that asks for ``ray_cluster``: a start costs
several seconds of both cores here. A module that needs a cluster of another shape asks for
``two_node_cluster``, which stops the shared one first; the next module asking for
``ray_cluster`` starts it again.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from segrl.engine.train import free_loopback_port, listen_on_loopback_only, use_local_cluster_env

# segrl's settings for a local cluster (faster health checks, no preemption watcher, workers
# at niceness 0), set before any cluster of the tests starts so that all of its processes
# inherit them.
use_local_cluster_env()


class SharedRay:
    """The session's local Ray cluster, started on first use and stopped on request."""

    def get(self):
        import ray

        if not ray.is_initialized():
            listen_on_loopback_only()  # as segrl's own local cluster: no port on another interface
            # "local": a new cluster even while another test's `ray start` cluster runs here,
            # which a plain ray.init() would join
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        return ray

    def stop(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()


@pytest.fixture(scope="session")
def shared_ray() -> Iterator[SharedRay]:
    holder = SharedRay()
    yield holder
    holder.stop()


@pytest.fixture(scope="module")
def ray_cluster(shared_ray: SharedRay):
    """The session's local 2-CPU Ray cluster; yields the ``ray`` module."""
    return shared_ray.get()


@pytest.fixture(scope="module")
def two_node_cluster(shared_ray: SharedRay):
    """Two Ray nodes of 1 CPU and 1 logical GPU each (``ray.cluster_utils.Cluster``), connected."""
    import ray
    from ray.cluster_utils import Cluster

    shared_ray.stop()
    # its own dashboard port: the state API it serves must not be another cluster's (the
    # local stack of a parallel test process takes Ray's default port)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1, "dashboard_port": free_loopback_port()})
    cluster.add_node(num_cpus=1, num_gpus=1)
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()

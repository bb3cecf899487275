"""Fixtures every test file can use: a fixed seed per test, the real data shared with the project, and one
local Ray of the test session's own.

Other Ray instances may run on the machine (another test session, a `ray start` cluster): the tests' Ray
is started with address="local", never joined by discovery, and every state-API call names its address
(`ray_local`'s value). A RAY_ADDRESS in the environment is dropped for the session, so that no `lamina`
command a test starts joins the cluster it names; a test that needs one sets it.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from support import start_ray

# Real data nobody on this project made (../shared/data from the repository root); absent for end users.
SHARED_DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()
TEST_RAY_CPUS = 4  # logical CPUs of the test Ray: three 1-CPU stages fit on this 2-core machine

_session_ray: dict[str, str] = {}  # the GCS address of the Ray this session started, while it runs
os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same global RNG state, so a failure reproduces when run alone."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def shared_data() -> Path:
    """The shared real-data folder, or a clean skip that says where it was looked for."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared real data not found at {SHARED_DATA}")
    return SHARED_DATA


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that need a Ray of another shape (a 2-node cluster) run last: the shared local Ray then
    starts once per session instead of again after them, while the other cluster's processes still exit."""
    items.sort(key=lambda item: "two_nodes" in getattr(item, "fixturenames", ()))


@pytest.fixture(scope="module")
def ray_local() -> Iterator[str]:
    """The session's local Ray (4 logical CPUs, dashboard for the state API, token auth as Ray sets it),
    started on first use and shared by every module; its GCS address. A module that needs a Ray of another
    shape (tests/test_multinode.py) shuts this one down, and the next module to ask starts it again.

    Metrics are exported every second instead of every few, so a test reads its gauges back sooner.
    """
    current = ray.get_runtime_context().gcs_address if ray.is_initialized() else None
    if current is None or current != _session_ray.get("address"):
        if ray.is_initialized():
            ray.shutdown()
        ctx = start_ray(lambda: ray.init(address="local", num_cpus=TEST_RAY_CPUS, include_dashboard=True,
                                         dashboard_host="127.0.0.1", logging_level="WARNING", log_to_driver=False,
                                         _system_config={"metrics_report_interval_ms": 1000}),
                        undo=ray.shutdown)
        _session_ray["address"] = ctx.address_info["gcs_address"]
    yield _session_ray["address"]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _exit_status["status"] = int(exitstatus)
    if ray.is_initialized():
        ray.shutdown()


_exit_status: dict[str, int] = {}


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave without the interpreter's teardown once a session has started Ray.

    Seen here: a session that started and stopped several Rays (the shared one, a 2-node cluster, the shared
    one again) passed every test, then died in the interpreter's teardown with SIGSEGV (exit 139; once in
    four runs), in the native threads Ray's core worker and gRPC leave behind. The result is decided and
    printed by now; exiting here keeps a crash after the verdict from turning it into a failure.
    """
    if _session_ray and "status" in _exit_status:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status["status"])

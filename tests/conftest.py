"""Suite-wide isolation: every test module starts without a Ray session left by another module.

Modules that use Ray start their own local cluster (on 127.0.0.1) in a fixture; this guard shuts
down any session still connected after a module, so a forgotten ``ray.shutdown()`` in one module
cannot make the next module's ``ray.init`` fail.
"""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep local Ray on 127.0.0.1
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(autouse=True, scope="module")
def _no_ray_session_leaks_between_modules():
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        serve = sys.modules.get("ray.serve")
        if serve is not None:
            try:
                serve.shutdown()
            except Exception:  # noqa: BLE001 - best effort; the session is going away anyway
                pass
        ray.shutdown()

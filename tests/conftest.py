"""Fixtures shared by the test modules."""

import pytest
import torch

from workbench.models.tiny import tiny_sd_pipeline
from workbench.threads import torch_threads


@pytest.fixture(scope="module")
def one_thread():
    """Run the module's tests with one torch thread, then restore the count.

    On a shared 2-core machine a busy second core makes 2-thread torch ops far slower than 1-thread ones.
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_runtime():
    """One local Ray runtime with 2 CPUs for the whole session, started when a test first asks for it (10-40 s
    on a 2-core machine) and shut down at the end."""
    ray = pytest.importorskip("ray")
    from workbench.sweep.ray_executor import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def pipe():
    """The tiny SD pipeline with one torch thread while the module's tests use it (one per module: tests
    palettize its UNet in place and restore it)."""
    with torch_threads(1):
        p = tiny_sd_pipeline()
        p.set_progress_bar_config(disable=True)
        yield p

"""Fixtures shared by the test modules, and one guard for all of them: no test reaches the network."""

import ipaddress
import os
import socket

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported (its constants read it once)

import huggingface_hub.constants  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from workbench.models.tiny import tiny_sd_pipeline  # noqa: E402
from workbench.threads import torch_threads  # noqa: E402

_connections: list = []  # every refused connection of the session, in order


def _on_this_machine(address) -> bool:
    """Whether a socket address is this machine's: a Unix socket path, or a loopback host (Ray, Jupyter kernels)."""
    if isinstance(address, (str, bytes)):
        return True
    host = address[0].decode() if isinstance(address[0], bytes) else str(address[0])
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return host == "localhost"


def _refusing(connect):
    def guarded(self, address, *args):
        # a datagram socket's connect sends nothing (Ray "connects" one to 8.8.8.8 to learn this machine's address)
        if self.type == socket.SOCK_STREAM and not _on_this_machine(address):
            _connections.append(address)
            raise ConnectionRefusedError(f"tests never use the network; refused a connection to {address!r}")
        return connect(self, address, *args)

    return guarded


@pytest.fixture(autouse=True, scope="session")
def no_network():
    """For the whole session: connections to anything but this machine are refused (and recorded), and the Hugging
    Face hub is in offline mode. Session-wide, so module fixtures that build pipelines are guarded too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", _refusing(socket.socket.connect))
        patch.setattr(socket.socket, "connect_ex", _refusing(socket.socket.connect_ex))
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield _connections


@pytest.fixture(autouse=True)
def _no_connection_attempted(no_network):
    """Fail the test that tried to connect, even where the code under test caught the refusal."""
    before = len(no_network)
    yield
    assert no_network[before:] == [], f"the test tried to reach the network: {no_network[before:]}"


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
    """The tiny SD pipeline (seed 0) with one torch thread while the module's tests use it (one per module: tests
    palettize its UNet in place and restore it)."""
    with torch_threads(1):
        p = tiny_sd_pipeline(seed=0)
        p.set_progress_bar_config(disable=True)
        yield p


def _seeded_net(*layers: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Sequential:
    net = torch.nn.Sequential(*layers)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * scale)
    return net.eval()


@pytest.fixture(scope="session")
def seeded_net():
    """`seeded_net(*layers, seed=0, scale=0.05)`: `nn.Sequential(*layers)` in eval mode, every parameter drawn from
    N(0, scale^2) by a generator seeded with `seed`: the same net for the same seed, whatever the global RNG."""
    return _seeded_net

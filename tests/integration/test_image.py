"""The container image, built here and run as Kubernetes runs it.

`deploy/docker/build-image` builds the Dockerfile with buildah on a local debootstrap'd
base (idempotent; cached layers make a rebuild take seconds). Then podman runs the image
as uid 10001 with a read-only root filesystem and host networking, against a simulated
gateway on the host's loopback: `payswitch validate` works inside, `/readyz` answers on
the probes port, a payment is routed, and SIGTERM drains an in-flight payment.

Marked `image`: `make image-test` runs only these; `make test` runs them with the rest
(about 40 s with the base image and layers cached, 2-3 min on a fresh machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from bench.procs import free_port
from proxy.aio import spawn_owned
from tests.support import gateways

pytestmark = [pytest.mark.image, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "deploy" / "docker" / "build-image"
UID = 10001
GRACE, DEADLINE = 1.5, 10.0

# runc with explicit limits: crun refuses this kind of host (cgroup v1 mounted beside a
# v2 hierarchy), and raising RLIMIT_NOFILE/NPROC to podman's defaults needs
# CAP_SYS_RESOURCE, which the host lacks. Both flags are harmless elsewhere.
PODMAN = ["podman", "--runtime", "runc"]
RUN = [
    "run",
    "--ulimit=nofile=4096:4096",
    "--ulimit=nproc=4096:4096",
    "--no-healthcheck",
    "--network=host",
    "--read-only",
    f"--user={UID}:{UID}",
    "--cap-drop=all",
    "--security-opt=no-new-privileges",
]

RULES = """\
gateways:
  eu1: {{url: 'http://127.0.0.1:{port}', region: eu}}
routes:
  - name: deposits
    match: {{path_prefix: /v1/deposits, methods: [POST]}}
    region: {{default: eu}}
    gateways: [eu1]
    timeouts: {{per_try: 5s, total: 8s}}
"""


@pytest.fixture(scope="module")
def image() -> str:
    """The image's name, built now (or found up to date in buildah's layer cache)."""
    started = time.monotonic()
    done = subprocess.run([str(BUILD)], capture_output=True, text=True, timeout=840, cwd=REPO)
    if done.returncode != 0:
        pytest.fail(f"building the image failed:\n{done.stdout}\n{done.stderr[-4000:]}")
    name, size, *_ = done.stdout.split()
    print(f"image {name}: {int(size) / 2**20:.0f} MiB, built in {time.monotonic() - started:.0f}s")
    return name


def podman(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)


def in_image(
    image: str, *command: str, mounts: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    volumes = [f"--volume={m}" for m in mounts]
    return podman(*RUN, "--rm", *volumes, "--entrypoint", command[0], image, *command[1:])


def test_image_is_labelled_runs_as_non_root_and_carries_no_installer(image: str) -> None:
    (info,) = json.loads(podman("image", "inspect", image).stdout)
    config = info["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["payswitch", "run"]
    labels = config["Labels"]
    for key in ("title", "version", "revision", "created", "source", "licenses"):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    assert labels["org.opencontainers.image.revision"] != "unknown"

    probe = (
        "import importlib.util as u, shutil, sys;"
        "found = [m for m in ('pip', 'setuptools', 'wheel', 'ensurepip', 'mypy', 'mypyc')"
        " if u.find_spec(m)];"
        "found += [t for t in ('pip', 'pip3', 'gcc', 'cc', 'make') if shutil.which(t)];"
        "import opentelemetry.exporter.otlp.proto.http.trace_exporter;"
        # The request path is the native build (deploy/native/build.py), and it loads.
        "import proxy.handler, proxy.retry, proxy.upstream.connection as c;"
        "native = all(m.__file__.endswith('.so') for m in (proxy.handler, proxy.retry, c));"
        "print(sys.version_info[:2], found, native)"
    )
    done = in_image(image, "python3", "-c", probe)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(3, 11) [] True", done.stdout


def test_validate_works_inside(image: str, tmp_path: Path) -> None:
    done = in_image(
        image, "payswitch", "validate", "/rules", mounts=(f"{REPO / 'rules'}:/rules:ro",)
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("ok:"), done.stdout

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "routes.yaml").write_text("routes:\n  - name: x\n    timeouts: {per_try: 5}\n")
    done = in_image(image, "payswitch", "validate", "/rules", mounts=(f"{bad}:/rules:ro",))
    assert done.returncode == 1
    assert "routes.yaml" in done.stderr, done.stderr


@contextlib.contextmanager
def container(image: str, rules: Path, env: dict[str, str]) -> Iterator[str]:
    name = f"payswitch-test-{free_port()}"
    flags = [f"--env={k}={v}" for k, v in env.items()]
    done = podman(
        *RUN,
        "--detach",
        f"--name={name}",
        f"--volume={rules}:/etc/payswitch/rules:ro",
        *flags,
        image,
    )
    assert done.returncode == 0, done.stderr
    try:
        yield name
    finally:
        podman("rm", "--force", "--time=0", name)


def logs(name: str) -> str:
    done = podman("logs", name)
    return (done.stdout + done.stderr)[-4000:]


async def wait_ready(http: aiohttp.ClientSession, url: str, name: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(url) as resp:
                if resp.status == 200:
                    return
        await asyncio.sleep(0.1)
    pytest.fail(f"{url} never answered 200:\n{logs(name)}")


@contextlib.asynccontextmanager
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        yield http


async def post(http: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, str]:
    async with http.post(url, data=body) as resp:
        return resp.status, await resp.text()


async def test_serves_a_payment_and_drains_on_sigterm(image: str, tmp_path: Path) -> None:
    listen, admin, probes = free_port(), free_port(), free_port()
    async with gateways("eu1") as g, session() as http:
        rules = tmp_path / "rules"
        rules.mkdir()
        (rules / "rules.yaml").write_text(RULES.format(port=g["eu1"].port))
        rules.chmod(0o755)
        env = {
            "PAYSWITCH_LISTEN": f"127.0.0.1:{listen}",
            "PAYSWITCH_ADMIN": f"127.0.0.1:{admin}",
            "PAYSWITCH_PROBES": f"127.0.0.1:{probes}",
            "PAYSWITCH_ADMIN_TOKEN": "t0ken",
            "PAYSWITCH_SHUTDOWN_GRACE": str(GRACE),
            "PAYSWITCH_SHUTDOWN_DEADLINE": str(DEADLINE),
        }
        with container(image, rules, env) as name:
            ready = f"http://127.0.0.1:{probes}/readyz"
            await wait_ready(http, ready, name)
            async with http.get(f"http://127.0.0.1:{probes}/metrics") as resp:
                assert "payswitch_config_generation" in await resp.text()
            async with http.get(f"http://127.0.0.1:{admin}/admin/config") as resp:
                assert resp.status == 401, "the token comes from the environment"

            pay = f"http://127.0.0.1:{listen}/v1/deposits"
            body = b'{"amount": 100, "currency": "EUR"}'
            async with http.post(pay, data=body) as resp:
                assert resp.status == 200, await resp.text()
                assert resp.headers["X-Payswitch-Gateway"] == "eu1"
            assert len(g["eu1"].requests()) == 1

            # A slow payment in flight when SIGTERM arrives still gets its answer.
            g["eu1"].set(delay=2.0)
            in_flight = spawn_owned(post(http, pay, body), name="in-flight-payment")
            await asyncio.sleep(0.5)
            assert podman("kill", "--signal=TERM", name).returncode == 0
            await asyncio.sleep(0.3)
            async with http.get(ready) as resp:
                assert resp.status == 503, "readiness fails as soon as the drain starts"
            status, text = await in_flight
            assert status == 200, text
            waited = podman("wait", name, timeout=GRACE + DEADLINE + 15)
            assert waited.stdout.strip() == "0", logs(name)
            assert len(g["eu1"].requests()) == 2

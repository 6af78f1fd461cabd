"""`make services-stop` (.ci/services-stop): stops the Redis .ci/services started, by its pid
file, and leaves any other process alone. Run on a copy of the scripts in a scratch tree,
so the suite's own Redis and broker keep serving."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from bench.procs import free_port

ROOT = Path(__file__).resolve().parents[2]


def scratch_tree(tmp_path: Path) -> Path:
    (tmp_path / ".ci" / "kafka").mkdir(parents=True)
    for script in (".ci/services-stop", ".ci/kafka/stop"):
        shutil.copy2(ROOT / script, tmp_path / script)
    (tmp_path / ".cache" / "redis").mkdir(parents=True)
    return tmp_path


def stop(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(tree / ".ci/services-stop")], capture_output=True, text=True, timeout=60
    )


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_stops_the_redis_its_pid_file_names(tmp_path: Path) -> None:
    tree = scratch_tree(tmp_path)
    pidfile = tree / ".cache/redis/pid"
    port = free_port()
    subprocess.run(
        ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", str(port),
         "--save", "", "--appendonly", "no", "--dir", str(tmp_path),
         "--logfile", str(tmp_path / "redis.log"), "--pidfile", str(pidfile)],
        check=True, timeout=30,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(pidfile.read_text())
    assert alive(pid)

    done = stop(tree)
    assert done.returncode == 0, done.stderr
    assert f"stopped redis (pid {pid})" in done.stderr
    assert not alive(pid)
    assert not pidfile.exists()
    assert stop(tree).returncode == 0  # nothing left to stop: still fine


def test_leaves_a_process_that_is_not_redis_alone(tmp_path: Path) -> None:
    tree = scratch_tree(tmp_path)
    other = subprocess.Popen(["sleep", "60"])
    try:
        (tree / ".cache/redis/pid").write_text(f"{other.pid}\n")
        done = stop(tree)
        assert done.returncode == 0, done.stderr
        assert other.poll() is None
        assert not (tree / ".cache/redis/pid").exists()  # a stale pid file is cleared
    finally:
        other.kill()
        other.wait()

"""One launcher of a real ``open-stt-server`` (or ``bentoml serve``) for the tests and the
benchmarks: a free loopback port, the environment it runs in, the process started in a process
group of its own and waited for until healthy, then stopped with SIGTERM. Also what is measured
from outside it: the resident memory of its process tree, and its /metrics."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_cli(*, path_first: bool = False) -> str:
    """The ``open-stt-server`` beside this Python (its environment's); ``path_first``: the one on
    ``PATH`` if there is one."""
    beside = str(Path(sys.executable).with_name("open-stt-server"))
    return (shutil.which("open-stt-server") or beside) if path_first else beside


def server_env(hf_cache: Path | None = None, home: Path | None = None, *, drop: tuple[str, ...] = ("OPEN_STT_",),
               **extra: str) -> dict[str, str]:
    """The environment of a server started from here: this process's without the variables that
    start with ``drop`` (our settings: the command's flags say what it serves), offline, BentoML's
    usage tracking off.

    ``hf_cache``: the hub cache it loads models from (HF_HUB_CACHE). ``home``: a test server's own
    folder: BentoML's home in it and no BENTOML_ variables of ours, and it stops 0.5 s after its
    last window rather than 5 s (the SIGTERM test keeps the default). ``extra``: set last."""
    if home is not None:
        drop = (*drop, "BENTOML_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    if hf_cache is not None:
        env["HF_HUB_CACHE"] = str(hf_cache)
    env.update(HF_HUB_OFFLINE="1", BENTOML_DO_NOT_TRACK="true")
    if home is not None:
        env.update(BENTOML_HOME=str(home / "bentoml"), OPEN_STT_SHUTDOWN_IDLE_SECONDS="0.5")
    env.update(extra)
    return env


class Server:
    """``cmd`` (a server on ``port``) started in a session of its own, its output in ``log``;
    constructed once ``health`` (``/health``; a model service alone: ``/readyz``) answers 200,
    else RuntimeError (it exited, or was not healthy within ``timeout`` s) with the log's end."""

    def __init__(self, cmd: list[str], env: dict[str, str], port: int, log: Path, *, timeout: float = 180,
                 health: str = "/health"):
        import httpx

        self.port, self.log = port, log
        self.base = f"http://127.0.0.1:{port}"
        log.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(self.base + health, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            self.stop()
            raise RuntimeError(f"server did not become healthy in {timeout:g} s:\n" + log.read_text()[-3000:])
        self.startup_seconds = time.perf_counter() - started

    def stop(self) -> int:
        """SIGTERM to its process group (SIGKILL after 30 s); its exit status."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL to the server and every process under it, as when its pod or machine dies
        (BentoML's workers run in process groups of their own: a killpg would miss them)."""
        import psutil

        try:
            processes = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.Error:
            return
        for p in reversed(processes):  # the workers first, so the arbiter cannot restart them
            try:
                p.kill()
            except psutil.Error:
                pass
        self.proc.wait()


class Rss:
    """The resident memory of a process and its children (a server's BentoML processes), summed.

    ``now()`` measures once. Between ``start()`` and ``stop()`` (or as a context manager) a thread
    measures it every ``interval`` s and keeps the peak in ``peak``, the first measure included."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def now(self) -> int:
        import psutil

        try:
            root = psutil.Process(self.pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.Error:  # gone
            return 0
        total = 0
        for p in processes:
            try:
                total += p.memory_info().rss
            except psutil.Error:  # a child that exited meanwhile
                pass
        return total

    def start(self) -> Rss:
        self.peak = max(self.peak, self.now())
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.now())

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Rss:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def scrape(server) -> dict[tuple[str, tuple], float]:
    """Every sample on ``server``'s /metrics (anything with a ``base`` URL), by (name, sorted labels)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(httpx.get(server.base + "/metrics", timeout=10).text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    """The sample ``name`` with exactly ``labels`` in a ``scrape`` (0 if absent)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict, name: str) -> float:
    """The samples ``name`` of a ``scrape`` summed over all their labels (every model's, route's...)."""
    return sum(v for (n, _), v in samples.items() if n == name)


def windows_in_flight(server) -> float:
    """Windows a model service holds right now: waiting in its queue, or in the batch it decodes
    (started: counted when its batch starts; finished: when it ends), every model's."""
    samples = scrape(server)
    return (total(samples, "openstt_queued_windows") + total(samples, "openstt_window_queue_seconds_count")
            - total(samples, "openstt_batch_windows_sum"))


def batches(server) -> float:
    """The batches ``server``'s model service has decoded so far, every model's."""
    return total(scrape(server), "openstt_batch_windows_count")

"""Lanes: the ways a request reaches the upstream, started side by side in one run.

=================  =====================================================================================
lane               what serves the client
=================  =====================================================================================
direct             the upstream itself (the floor every "added" figure is measured against)
trioproxy-1        ``python -m trioproxy serve``: one process, pinned to CPU 1
trioproxy-bare     ``python -m bench.bare``: the same server, pool and relay without the gateway, pinned to CPU 1
trioproxy-N        ``python -m trioproxy serve --workers N``: N SO_REUSEPORT workers, unpinned (N = cores)
nginx              nginx as a reverse proxy (one worker, CPU 1) doing the same key check and key swap
litellm            LiteLLM's proxy (one worker, CPU 1), when ``litellm`` is installed
=================  =====================================================================================

A peer that is not installed is reported as skipped with the reason; nothing is ever substituted for it.
Every lane answers three scenarios: ``small`` and ``large`` JSON chat completions and ``stream`` (SSE).

This module also holds the process plumbing the suite shares: starting a process (optionally pinned with
``taskset``), waiting for its port, stopping it by its own pid, and reading CPU time, RSS, PSS and open
descriptors of a process tree from ``/proc``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bench.loadgen import Target

if TYPE_CHECKING:
    from bench.upstreams import Upstreams

SCENARIO_KINDS = ("small", "large", "stream")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

# ------------------------------------------------------------------------------------------ processes


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def can_pin() -> bool:
    """More than one core on the machine (whatever this process is pinned to now) and taskset installed."""
    return (os.cpu_count() or 1) > 1 and shutil.which("taskset") is not None


def pinned(cpu: int | str | None) -> list[str]:
    """``taskset -c CPU`` when pinning is possible, else nothing."""
    return ["taskset", "-c", str(cpu)] if cpu is not None and can_pin() else []


def set_affinity(pids: list[int], cpus: set[int]) -> None:
    """Move every thread of these processes to ``cpus`` (``taskset -a -p``)."""
    for pid in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for tid in tids:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, cpus)


def all_cpus() -> str:
    return ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, process: subprocess.Popen[bytes] | None = None, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with status {process.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            # Blocking pause in the suite's synchronous set-up phase (no trio loop runs here).
            select_pause(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout:.0f} s")


def select_pause(seconds: float) -> None:
    """Sleep without time.sleep (banned in this repository): a select() on nothing."""
    import select

    select.select([], [], [], seconds)


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return self.popen.returncode


def start_process(
    name: str,
    command: list[str],
    workdir: Path,
    *,
    env: dict[str, str] | None = None,
    wait_port: int | None = None,
    stdout_to_log: bool = True,
) -> Process:
    log = workdir / f"{name}.log"
    with log.open("ab") as out:
        popen = subprocess.Popen(
            command, env=env, stdout=out if stdout_to_log else subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
    process = Process(name, popen, log)
    if wait_port is not None:
        try:
            wait_for_port(wait_port, popen)
        except RuntimeError as exc:
            process.stop()
            tail = log.read_text(errors="replace")[-1500:]
            raise RuntimeError(f"{name}: {exc}; its log ends with:\n{tail}") from None
        except BaseException:
            process.stop()
            raise
    return process


# ---------------------------------------------------------------------------------------------- /proc


def process_role(pid: int) -> str:
    """What a process of a lane is, from its command line: a trioproxy data-plane worker (with or without the
    admin plane), the supervisor of a worker group, a single gateway process, or another program."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "gone"
    if "trioproxy.workers" in argv:
        return "worker + admin" if "--control-plane" in argv else "worker"
    if "serve" in argv and any(arg.endswith("trioproxy") for arg in argv):
        count = argv[argv.index("--workers") + 1] if "--workers" in argv else "auto"
        return "gateway (one process)" if count == "1" else "supervisor"
    return Path(argv[0]).name if argv and argv[0] else "?"


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (from /proc/*/stat parent pids)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes (live ones; a process that exited meanwhile counts 0)."""
    total = 0
    for pid in pids:
        try:
            fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields_[11]) + int(fields_[12])
    return total / CLK_TCK


def memory(pids: list[int]) -> dict[str, float]:
    """RSS and PSS in MB, summed over the processes (PSS counts shared pages once)."""
    rss = pss = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            continue
    return {"rss_mb": rss / 1024, "pss_mb": pss / 1024}


def open_fds(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{pid}/fd"))
    return total


def cpu_busy() -> list[tuple[int, int]]:
    """(busy, total) jiffies per CPU from /proc/stat; diff two readings for busy shares."""
    rows = []
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3].isdigit():
            values = [int(v) for v in line.split()[1:]]
            idle = values[3] + values[4]
            rows.append((sum(values) - idle, sum(values)))
    return rows


def busy_shares(before: list[tuple[int, int]], after: list[tuple[int, int]]) -> list[float]:
    return [
        (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0 for (b0, t0), (b1, t1) in zip(before, after, strict=False)
    ]


# ----------------------------------------------------------------------------------------------- lanes


@dataclass
class Lane:
    """One lane: how to start it, where it answers each scenario, and which processes to measure."""

    name: str
    description: str
    skipped: str | None = None  # the reason, when the lane could not run on this machine
    targets: dict[str, Target] = field(default_factory=dict)
    model: str = "gpt-4o-mini"
    processes: list[Process] = field(default_factory=list)
    is_proxy: bool = True
    workers: int = 1
    version: str = ""
    command: str = ""

    def pids(self) -> list[int]:
        pids: list[int] = []
        for process in self.processes:
            pids += process_tree(process.pid)
        return pids

    def stop(self) -> dict[str, int | None]:
        return {process.name: process.stop() for process in self.processes}


def direct_lane(upstreams: Upstreams) -> Lane:
    lane = Lane(
        "direct", f"straight to the upstream ({upstreams.kind})", is_proxy=False, version=upstreams.version
    )
    auth = (("authorization", f"Bearer {upstream_key()}"),)
    host = upstreams.host
    lane.targets = {
        "small": Target(host, upstreams.json_port, "/v1/chat/completions", auth),
        "large": Target(host, upstreams.large_port, f"{upstreams.large_prefix}/v1/chat/completions", auth),
        "stream": Target(host, upstreams.stream_port, "/v1/chat/completions", auth),
    }
    lane.processes = list(upstreams.processes)
    return lane


def upstream_key() -> str:
    from bench.upstreams import UPSTREAM_KEY

    return UPSTREAM_KEY


# --- trioproxy ----------------------------------------------------------------------------------------


def trioproxy_env(data_dir: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIOPROXY_")}
    env.update(
        {
            "TRIOPROXY_DATA_DIR": str(data_dir),
            "TRIOPROXY_PROXY_HOST": "127.0.0.1",
            "TRIOPROXY_PROXY_PORT": str(port),
            # Each lane runs its own control plane: on a free port, with a fixed bootstrap password (the
            # bench never logs in; a generated one would only be printed).
            "TRIOPROXY_ADMIN_PORT": "0",
            "TRIOPROXY_ADMIN_PASSWORD": "bench-only-admin-password-0",
            "TRIOPROXY_ALLOW_PRIVATE_UPSTREAMS": "true",
            "TRIOPROXY_LOG_LEVEL": "WARNING",
            "TRIOPROXY_DRAIN_TIMEOUT": "5",
        }
    )
    # Experiments: BENCH_TRIOPROXY_X=v reaches the gateway as TRIOPROXY_X=v (the report's commands say so).
    env.update({k[len("BENCH_") :]: v for k, v in os.environ.items() if k.startswith("BENCH_TRIOPROXY_")})
    return env


def provision_trioproxy(data_dir: Path, upstreams: Upstreams) -> dict[str, str]:
    """Providers, provider keys and one gateway key per scenario, with the CLI (as a user would)."""
    env = trioproxy_env(data_dir, 0)

    def cli(*args: str, stdin: str | None = None) -> dict[str, object]:
        done = subprocess.run(
            [sys.executable, "-m", "trioproxy", *args],
            env=env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"trioproxy {' '.join(args[:2])} failed: {done.stderr.strip()}")
        result: dict[str, object] = json.loads(done.stdout)
        return result

    keys = {}
    for scenario in SCENARIO_KINDS:
        name = f"bench-{scenario}"
        cli("provider", "add", name, "--kind", "openai", "--base-url", upstreams.base_url(scenario))
        cli("provider-key", "add", "--provider", name, "--name", "k1", "--secret", "-", stdin=upstream_key())
        keys[scenario] = str(cli("key", "create", "--name", name, "--provider", name)["key"])
    return keys


def trioproxy_lane(
    workdir: Path, data_dir: Path, keys: dict[str, str], workers: int | None, cpu: str | None
) -> Lane:
    """``workers=None``: the single process; else the supervisor with N workers."""
    port = free_port()
    name = "trioproxy-1" if workers is None else f"trioproxy-{workers}w"
    command = [sys.executable, "-m", "trioproxy", "serve", "--workers", str(workers or 1)]
    command = [*pinned(cpu), *command]
    process = start_process(name, command, workdir, env=trioproxy_env(data_dir, port), wait_port=port)
    if workers is not None:
        _wait_workers(process, workers)
    from importlib.metadata import version

    lane = Lane(
        name,
        "trioproxy, one process" if workers is None else f"trioproxy, {workers} SO_REUSEPORT workers",
        processes=[process],
        workers=workers or 1,
        version=f"trioproxy {version('trioproxy')}",
        command=" ".join(command[command.index(sys.executable) :]).replace(sys.executable, "python"),
    )
    lane.targets = {
        scenario: Target(
            "127.0.0.1", port, "/v1/chat/completions", (("authorization", f"Bearer {keys[scenario]}"),)
        )
        for scenario in SCENARIO_KINDS
    }
    return lane


def bare_lane(workdir: Path, upstreams: Upstreams, cpu: str | None) -> Lane:
    """``python -m bench.bare``: trioproxy's server, pool and relay without the gateway (bench/bare.py)."""
    port = free_port()
    command = [*pinned(cpu), sys.executable, "-m", "bench.bare", "--port", str(port), "--key", upstream_key()]
    client_keys = {scenario: f"sk-bare-{scenario}" for scenario in SCENARIO_KINDS}
    for scenario, client_key in client_keys.items():
        command += ["--route", f"{client_key}={upstreams.base_url(scenario)}"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    process = start_process("trioproxy-bare", command, workdir, env=env, wait_port=port)
    from importlib.metadata import version

    lane = Lane(
        "trioproxy-bare",
        "trioproxy's forwarder without auth, balancing, limits or metering (one process)",
        processes=[process],
        version=f"trioproxy {version('trioproxy')}",
        command="python -m bench.bare --route KEY=URL ...",
    )
    lane.targets = {
        scenario: Target(
            "127.0.0.1", port, "/v1/chat/completions", (("authorization", f"Bearer {client_keys[scenario]}"),)
        )
        for scenario in SCENARIO_KINDS
    }
    return lane


def _wait_workers(process: Process, workers: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if f"trioproxy: {workers} workers ready" in process.log.read_text(errors="replace"):
            return
        if process.popen.poll() is not None:
            raise RuntimeError(f"{process.name} exited with status {process.popen.returncode}")
        select_pause(0.05)
    raise RuntimeError(f"{process.name}: the workers did not all start")


# --- nginx reverse proxy -------------------------------------------------------------------------------

_NGINX_PROXY = """\
worker_processes 1;
daemon off;
master_process on;
pid {workdir}/nginx-proxy.pid;
error_log {workdir}/nginx-proxy.error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_body_temp_path {workdir}/proxy-body;
    proxy_temp_path {workdir}/proxy-proxy;
    fastcgi_temp_path {workdir}/proxy-fastcgi;
    uwsgi_temp_path {workdir}/proxy-uwsgi;
    scgi_temp_path {workdir}/proxy-scgi;
    # The AI-proxy work in nginx terms: check the client key, swap in the provider key.
    map $http_authorization $client_ok {{ default 0; "Bearer {client_key}" 1; }}
    upstream json_up {{ server {json}; keepalive 256; }}
    upstream large_up {{ server {large}; keepalive 256; }}
    upstream stream_up {{ server {stream}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Authorization "Bearer {upstream_key}";
        proxy_buffering off;
        location = /v1/chat/completions {{
            if ($client_ok = 0) {{ return 401; }}
            proxy_pass http://json_up;
        }}
        location = /large/v1/chat/completions {{
            if ($client_ok = 0) {{ return 401; }}
            proxy_pass http://large_up{large_prefix}/v1/chat/completions;
        }}
        location = /stream/v1/chat/completions {{
            if ($client_ok = 0) {{ return 401; }}
            proxy_pass http://stream_up/v1/chat/completions;
        }}
    }}
}}
"""


def nginx_lane(workdir: Path, upstreams: Upstreams, cpu: str | None) -> Lane:
    from bench.upstreams import nginx_path, nginx_version

    nginx = nginx_path()
    if nginx is None:
        return Lane("nginx", "nginx reverse proxy", skipped="nginx is not installed")
    port = free_port()
    client_key = "sk-client-bench"
    conf = workdir / "nginx-proxy.conf"
    conf.write_text(
        _NGINX_PROXY.format(
            workdir=workdir,
            port=port,
            client_key=client_key,
            upstream_key=upstream_key(),
            json=f"{upstreams.host}:{upstreams.json_port}",
            large=f"{upstreams.host}:{upstreams.large_port}",
            large_prefix=upstreams.large_prefix,
            stream=f"{upstreams.host}:{upstreams.stream_port}",
        )
    )
    command = [*pinned(cpu), nginx, "-c", str(conf), "-p", str(workdir)]
    process = start_process("nginx-proxy", command, workdir, wait_port=port)
    auth = (("authorization", f"Bearer {client_key}"),)
    lane = Lane(
        "nginx",
        "nginx reverse proxy, 1 worker (key check + key swap, keepalive pool)",
        processes=[process],
        version=f"nginx {nginx_version()}",
        command=f"nginx -c nginx-proxy.conf (worker_processes 1; config in {conf.name})",
    )
    lane.targets = {
        "small": Target("127.0.0.1", port, "/v1/chat/completions", auth),
        "large": Target("127.0.0.1", port, "/large/v1/chat/completions", auth),
        "stream": Target("127.0.0.1", port, "/stream/v1/chat/completions", auth),
    }
    return lane


# --- LiteLLM -------------------------------------------------------------------------------------------

_LITELLM_CONFIG = """\
model_list:
{models}
router_settings:
  routing_strategy: simple-shuffle
litellm_settings:
  set_verbose: false
general_settings:
  master_key: {client_key}
  disable_spend_logs: true
  disable_error_logs: true
  allow_requests_on_db_unavailable: true
"""


def litellm_path() -> str | None:
    beside = Path(sys.executable).with_name("litellm")
    return str(beside) if beside.exists() else shutil.which("litellm")


def litellm_lane(workdir: Path, upstreams: Upstreams, cpu: str | None, workers: int = 1) -> Lane:
    """LiteLLM's proxy as perf-anchors.md §1.4 ran it (master-key auth, no database), when installed; with
    ``workers`` > 1 the ``litellm-Nw`` lane (``--num_workers N``, unpinned like trioproxy's workers)."""
    name = "litellm" if workers == 1 else f"litellm-{workers}w"
    litellm = litellm_path()
    if litellm is None:
        return Lane(name, "LiteLLM proxy", skipped="LiteLLM is not installed (`litellm` not on the PATH)")
    port = free_port()
    client_key = "sk-client-bench"
    models = "\n".join(
        f"  - model_name: bench-{scenario}\n    litellm_params:\n      model: openai/gpt-4o-mini\n"
        f"      api_base: {upstreams.base_url(scenario)}/v1\n      api_key: {upstream_key()}"
        for scenario in SCENARIO_KINDS
    )
    conf = workdir / f"{name}.yaml"
    conf.write_text(_LITELLM_CONFIG.format(models=models, client_key=client_key))
    env = {
        **os.environ,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOG": "ERROR",
        "LITELLM_MODE": "PRODUCTION",
        "LITELLM_TELEMETRY": "False",
    }
    command = [
        *pinned(cpu),
        litellm,
        "--config",
        str(conf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        str(workers),
        # uvicorn closes idle keep-alive connections after 5 s by default; the idle scenario holds them longer.
        "--keepalive_timeout",
        "300",
    ]
    process = start_process(name, command, workdir, env=env, wait_port=port)
    done = subprocess.run([litellm, "--version"], capture_output=True, text=True, check=False, env=env)
    auth = (("authorization", f"Bearer {client_key}"),)
    lane = Lane(
        name,
        f"LiteLLM proxy, {workers} worker{'s' if workers > 1 else ''} (master key, no database)",
        processes=[process],
        version=f"litellm {(done.stdout or done.stderr).strip().splitlines()[-1] if (done.stdout or done.stderr).strip() else '?'}",
        command=f"litellm --config litellm.yaml --num_workers {workers}",
        workers=workers,
    )
    # LiteLLM routes by model name, so each scenario has its own model.
    lane.targets = {
        scenario: Target("127.0.0.1", port, "/v1/chat/completions", auth) for scenario in SCENARIO_KINDS
    }
    lane.model = "bench-{scenario}"
    return lane

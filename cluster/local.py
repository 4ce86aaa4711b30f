"""A local Ray cluster on one machine: one head plus N worker nodes (separate raylets), token authentication on.

    python -m cluster.local up [--dir DIR] [--workers N] [--head-cpus X] [--worker-cpus Y] [--head-gpus G]
                               [--worker-gpus G] [--worker-resources JSON] [--port P] [--dashboard-port D]
                               [--object-store-mb M] [--timeout S]
    source DIR/env                      # RAY_ADDRESS, RAY_API_SERVER_ADDRESS, RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH
    ray job submit --runtime-env cluster/runtime_env.yaml -- python -m jobs.infer ...
    python -m cluster.local status [--dir DIR]      # exit 0 if running, 1 if not
    python -m cluster.local down [--dir DIR]        # idempotent

DIR defaults to $RAY_PIPELINES_CLUSTER_DIR, else /tmp/ray-pipelines-local. It holds:
  auth_token    a fresh random token per `up` (mode 0600); every node and client reads it via RAY_AUTH_TOKEN_PATH
  cluster.json  GCS address, dashboard URL, token path, Ray temp dir, session ids, nodes
  env           `source`-able exports for clients

Every node of the cluster gets the same short Ray --temp-dir, /tmp/rpl-<8 hex of DIR> (unix socket paths must stay
under ~107 characters). `down` stops exactly this cluster's processes, never `ray stop`:
  - Ray processes whose command line holds that temp dir (gcs_server, raylets, dashboard, monitors);
  - Ray processes in the sessions of this cluster's `ray start` calls (each runs in a new session; workers whose
    titles are rewritten to ray::IDLE keep it);
  - every descendant of those (dashboard agents, runtime-env agents, workers, job drivers).
All but the GCS get SIGTERM, then the GCS (a raylet that loses the GCS while shutting down hangs), then SIGKILL
goes to anything left after a grace period. Other Ray clusters on the machine are left alone.

Ports: GCS and dashboard ports are picked free unless given. Everything else a raylet opens is bound to port 0 (the
OS picks), so that several raylets and other clusters on the machine never collide: the dashboard agent's HTTP port
(Ray defaults it to 52365: a second raylet would fail to bind and silently run without it), worker ports (Ray
defaults to the shared range 10002-19999). The head's Ray Client server (ray://; Ray defaults it to 10001 and it
cannot be turned off) gets a free port too. The dashboard listens on 127.0.0.1 only; the GCS and raylets listen on
all interfaces (Ray gives no choice), which is why token authentication is on.

`up` on a DIR whose cluster still has processes refuses (exit 1) and says to run `down` first.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_DIR = "/tmp/ray-pipelines-local"
DIR_ENV_VAR = "RAY_PIPELINES_CLUSTER_DIR"
STATE_FILE = "cluster.json"
TOKEN_FILE = "auth_token"
ENV_FILE = "env"
LOCALHOST = "127.0.0.1"
RAY_START_TIMEOUT_S = 120
STOP_GRACE_S = 10.0


# ----------------------------------------------------------------------------------------------- paths and state


def ray_temp_dir(cluster_dir: str | Path) -> str:
    """The short Ray --temp-dir of the cluster in `cluster_dir`: /tmp/rpl-<8 hex chars of its absolute path>."""
    digest = hashlib.sha256(str(Path(cluster_dir).resolve()).encode()).hexdigest()[:8]
    return f"/tmp/rpl-{digest}"


def read_state(cluster_dir: str | Path) -> dict | None:
    """The cluster.json content of `cluster_dir`, or None when no cluster was started there."""
    path = Path(cluster_dir) / STATE_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def env(cluster_dir: str | Path) -> dict[str, str]:
    """The environment variables a client process needs to reach the cluster in `cluster_dir`.

    RAY_ADDRESS is the GCS address (what `ray.init()` and `ray status` want); RAY_API_SERVER_ADDRESS is the dashboard
    URL, which `ray job submit` and JobSubmissionClient read before RAY_ADDRESS.
    """
    state = read_state(cluster_dir)
    if state is None:
        raise FileNotFoundError(
            f"no cluster in {cluster_dir} (no {STATE_FILE}); start one with `python -m cluster.local up`"
        )
    return {
        "RAY_ADDRESS": state["gcs_address"],
        "RAY_API_SERVER_ADDRESS": state["dashboard_url"],
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": state["token_path"],
    }


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path` readable by the owner only (0600), also when the file already exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)


def _write_env_file(path: Path, variables: dict[str, str]) -> None:
    lines = [f"export {name}='{value}'" for name, value in variables.items()]
    path.write_text(
        "# source this file to talk to the local Ray cluster (python -m cluster.local)\n" + "\n".join(lines) + "\n"
    )


# ----------------------------------------------------------------------------------------------- processes


@dataclasses.dataclass(frozen=True)
class _Proc:
    pid: int
    ppid: int
    sid: int
    state: str
    cmdline: str


def _read_proc(pid: int) -> _Proc | None:
    """One process from /proc, or None when it is gone or not ours."""
    try:
        if os.stat(f"/proc/{pid}").st_uid != os.getuid():
            return None
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the name in (...) may hold spaces
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return _Proc(pid=pid, ppid=int(fields[1]), sid=int(fields[3]), state=fields[0], cmdline=cmdline)


def _live_processes() -> dict[int, _Proc]:
    """Every live (not zombie) process of this user, by pid."""
    if not os.path.isdir("/proc/self"):
        raise RuntimeError("cluster.local finds the cluster's processes through /proc: it runs on Linux only")
    procs = (_read_proc(int(name)) for name in os.listdir("/proc") if name.isdigit())
    return {p.pid: p for p in procs if p is not None and p.state != "Z"}


def _ancestors(procs: dict[int, _Proc], pid: int) -> set[int]:
    seen = set()
    while pid in procs and pid not in seen:
        seen.add(pid)
        pid = procs[pid].ppid
    return seen


def _looks_like_ray(cmdline: str) -> bool:
    """Ray daemons run from the ray package (a path or `-m ray.`); workers and agents retitle themselves ray::..."""
    return "/ray/" in cmdline or " -m ray." in cmdline or cmdline.startswith(("ray::", "ray-dashboard-"))


def cluster_pids(temp_dir: str, session_ids: list[int] = ()) -> set[int]:
    """Pids of the live processes of the cluster whose Ray temp dir is `temp_dir` (see the module docstring)."""
    procs = _live_processes()
    marked = {
        p.pid for p in procs.values() if _looks_like_ray(p.cmdline) and (temp_dir in p.cmdline or p.sid in session_ids)
    }
    children: dict[int, list[int]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p.pid)
    stack = list(marked)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in marked:
                marked.add(child)
                stack.append(child)
    return marked - _ancestors(procs, os.getpid())


def _signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _terminate(pids: set[int], grace_s: float) -> set[int]:
    """SIGTERM `pids` and wait up to `grace_s` for them to exit; returns those still alive."""
    _signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while pids and time.monotonic() < deadline:
        time.sleep(0.1)
        pids = pids & set(_live_processes())
    return pids


def _stop_processes(temp_dir: str, session_ids: list[int], grace_s: float = STOP_GRACE_S) -> None:
    """Stop every process of the cluster: SIGTERM all but the GCS, then the GCS, then SIGKILL what is left.

    The GCS goes last because a raylet that loses it mid-shutdown hangs until killed. Raises if a process
    survives SIGKILL.
    """
    pids = cluster_pids(temp_dir, session_ids)
    if not pids:
        return
    logger.info("stopping %d processes of the cluster in %s", len(pids), temp_dir)
    procs = _live_processes()
    gcs = {pid for pid in pids if pid in procs and "gcs_server" in procs[pid].cmdline.split(" ")[0]}
    left = _terminate(pids - gcs, grace_s) | _terminate(gcs, grace_s)
    # A raylet may have started a worker while we waited: take a fresh look as well.
    left |= cluster_pids(temp_dir, session_ids)
    if left:
        logger.warning("SIGKILL to %d processes that outlived SIGTERM: %s", len(left), sorted(left))
        _signal_all(left, signal.SIGKILL)
        time.sleep(0.5)
    survivors = cluster_pids(temp_dir, session_ids)
    if survivors:
        raise RuntimeError(f"processes of the cluster in {temp_dir} survived SIGKILL: {sorted(survivors)}")


# ----------------------------------------------------------------------------------------------- dashboard


def _dashboard_get(url: str, token: str, timeout_s: float = 5.0) -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


def _list_nodes(dashboard_url: str, token: str) -> list[dict]:
    """Nodes as the dashboard's state API sees them: id, ip, head or not, alive or not, resources."""
    body = _dashboard_get(f"{dashboard_url}/api/v0/nodes?limit=10000&detail=true", token)
    if not body.get("result"):
        raise RuntimeError(f"the dashboard state API answered with an error: {body.get('msg')}")
    nodes = []
    for node in body["data"]["result"]["result"]:
        resources = dict(node.get("resources_total") or {})
        nodes.append(
            {
                "node_id": node["node_id"],
                "node_ip": node["node_ip"],
                "is_head": bool(node.get("is_head_node")),
                "alive": node["state"] == "ALIVE",
                "cpus": resources.pop("CPU", 0.0),
                "gpus": resources.pop("GPU", 0.0),
                "resources": {k: v for k, v in resources.items() if not _is_builtin_resource(k)},
            }
        )
    return sorted(nodes, key=lambda n: (not n["is_head"], n["node_id"]))


def _is_builtin_resource(name: str) -> bool:
    return name in ("memory", "object_store_memory") or name.startswith("node:")


def _dashboard_answers(dashboard_url: str, token: str) -> bool:
    try:
        _dashboard_get(f"{dashboard_url}/api/version", token, timeout_s=3.0)
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _wait_for_nodes(dashboard_url: str, token: str, expected: int, timeout_s: float) -> list[dict]:
    """Poll the dashboard until `expected` nodes are alive; raises TimeoutError naming what was seen."""
    deadline = time.monotonic() + timeout_s
    seen: list[dict] = []
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            seen = _list_nodes(dashboard_url, token)
            last_error = None
            if sum(n["alive"] for n in seen) >= expected:
                return [n for n in seen if n["alive"]]
        except (urllib.error.URLError, OSError, ValueError, RuntimeError) as e:
            last_error = e
        time.sleep(0.5)
    alive = sum(n["alive"] for n in seen)
    detail = f"; last error: {last_error}" if last_error else ""
    raise TimeoutError(f"{alive} of {expected} nodes alive after {timeout_s:.0f}s at {dashboard_url}{detail}")


# ----------------------------------------------------------------------------------------------- up / down / status


def _ray_start(args: list[str], environ: dict[str, str]) -> subprocess.Popen:
    """Launch `ray start ARGS` in a new session (its daemons inherit the session id, which `down` uses)."""
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", *args]
    return subprocess.Popen(
        command, env=environ, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(process: subprocess.Popen, what: str) -> None:
    try:
        output, _ = process.communicate(timeout=RAY_START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    if process.returncode != 0:
        tail = "\n".join(output.splitlines()[-15:])
        raise RuntimeError(f"`ray start` for the {what} failed (exit {process.returncode}):\n{tail}")


def _node_args(
    temp_dir: str, cpus: int, gpus: int | None, resources: dict | None, object_store_memory: int | None
) -> list[str]:
    """`ray start` options shared by the head and the workers."""
    args = [
        f"--temp-dir={temp_dir}",
        f"--num-cpus={cpus}",
        "--dashboard-agent-listen-port=0",
        "--min-worker-port=0",
        "--max-worker-port=0",
        "--disable-usage-stats",
    ]
    if gpus is not None:
        args.append(f"--num-gpus={gpus}")
    if resources:
        args.append(f"--resources={json.dumps(resources)}")
    if object_store_memory:
        args.append(f"--object-store-memory={object_store_memory}")
    return args


def _ray_environ(base_environ: dict[str, str], token_path: Path) -> dict[str, str]:
    """The environment for `ray start`: token auth on, no address or token from another cluster, and this
    interpreter's bin/ first on PATH so that `python` in a job entrypoint is the cluster's own Python."""
    environ = {
        k: v for k, v in base_environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")
    }
    environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path), RAY_USAGE_STATS_ENABLED="0")
    environ["PATH"] = os.pathsep.join(filter(None, [os.path.dirname(sys.executable), environ.get("PATH")]))
    return environ


@dataclasses.dataclass(frozen=True)
class Layout:
    """What each node offers. Counts are integers because `ray start` takes integers."""

    workers: int = 0
    head_cpus: int = 1
    worker_cpus: int = 1
    head_gpus: int | None = None  # None: what Ray detects
    worker_gpus: int = 0
    worker_resources: dict[str, float] | None = None
    object_store_memory: int | None = None  # bytes per node; None: Ray's default

    def __post_init__(self):
        counts = {name: getattr(self, name) for name in ("workers", "head_cpus", "worker_cpus", "worker_gpus")}
        counts["head_gpus"] = self.head_gpus if self.head_gpus is not None else 0
        bad = {name: n for name, n in counts.items() if not isinstance(n, int) or n < 0}
        if bad:
            raise ValueError(f"node counts must be integers >= 0, got {bad}")
        reserved = {"CPU", "GPU", "memory", "object_store_memory"} & set(self.worker_resources or {})
        if reserved:
            raise ValueError(f"{sorted(reserved)} cannot be custom resources; use the CPU and GPU counts")

    def head_args(self, temp_dir: str) -> list[str]:
        return _node_args(temp_dir, self.head_cpus, self.head_gpus, None, self.object_store_memory)

    def worker_args(self, temp_dir: str) -> list[str]:
        return _node_args(temp_dir, self.worker_cpus, self.worker_gpus, self.worker_resources, self.object_store_memory)


def _free_ports(wanted: dict[str, int | None]) -> dict[str, int]:
    """The given ports (checked free: Ray would wait ~40 s before failing), and distinct free ports for the rest."""
    sockets = []
    try:
        for name, port in wanted.items():
            sockets.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            try:
                sockets[-1].bind(("", port or 0))  # held until all are picked: no port is handed out twice
            except OSError as e:
                raise ValueError(f"{name} port {port} is not free ({e.strerror}); pick another or leave it out") from e
        return {name: s.getsockname()[1] for name, s in zip(wanted, sockets)}
    finally:
        for s in sockets:
            s.close()


def _start_nodes(
    layout: Layout, ports: dict[str, int], temp_dir: str, environ: dict[str, str], session_ids: list[int]
) -> None:
    """`ray start` the head, then all workers at once; appends each `ray start` session id to `session_ids`."""
    head_args = [
        "--head",
        f"--port={ports['gcs']}",
        "--include-dashboard=true",
        f"--dashboard-host={LOCALHOST}",
        f"--dashboard-port={ports['dashboard']}",
        f"--ray-client-server-port={ports['client']}",
    ]
    head = _ray_start(head_args + layout.head_args(temp_dir), environ)
    session_ids.append(head.pid)
    _finish(head, "head")
    worker_args = [f"--address={LOCALHOST}:{ports['gcs']}", *layout.worker_args(temp_dir)]
    starts = [_ray_start(worker_args, environ) for _ in range(layout.workers)]
    session_ids += [start.pid for start in starts]
    for i, start in enumerate(starts):
        _finish(start, f"worker {i + 1} of {len(starts)}")


def _refuse_if_running(cluster_dir: Path, temp_dir: str) -> None:
    running = cluster_pids(temp_dir, (read_state(cluster_dir) or {}).get("session_ids", []))
    if running:
        raise RuntimeError(
            f"a cluster of {cluster_dir} is already running ({len(running)} processes under {temp_dir}); "
            f"stop it first: python -m cluster.local down --dir {cluster_dir}"
        )


def up(
    cluster_dir: str | Path,
    workers: int = 0,
    head_cpus: int | None = None,
    worker_cpus: int = 1,
    head_gpus: int | None = None,
    worker_gpus: int = 0,
    worker_resources: dict[str, float] | None = None,
    port: int | None = None,
    dashboard_port: int | None = None,
    object_store_memory: int | None = None,
    timeout_s: float = 60.0,
    base_environ: dict[str, str] | None = None,
) -> dict:
    """Start a head and `workers` worker nodes with token auth; wait until all are alive; returns cluster.json.

    GPUs: the head reports what Ray detects unless `head_gpus` is given; workers report `worker_gpus` (default 0,
    so that the machine's GPUs are not counted once per raylet). `base_environ` is the environment the Ray
    processes start from (default: this process's). Raises RuntimeError when a cluster of `cluster_dir` is already
    running, TimeoutError when the nodes are not all alive after `timeout_s` (the processes are then stopped; the
    logs stay in the Ray temp dir until the next `up` or `down`).
    """
    layout = Layout(
        workers=workers,
        head_cpus=os.cpu_count() if head_cpus is None else head_cpus,
        worker_cpus=worker_cpus,
        head_gpus=head_gpus,
        worker_gpus=worker_gpus,
        worker_resources=worker_resources,
        object_store_memory=object_store_memory,
    )
    cluster_dir = Path(cluster_dir).resolve()
    temp_dir = ray_temp_dir(cluster_dir)
    _refuse_if_running(cluster_dir, temp_dir)
    ports = _free_ports({"gcs": port, "dashboard": dashboard_port, "client": None})
    _clear(cluster_dir, temp_dir)
    cluster_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    token_path = cluster_dir / TOKEN_FILE
    token = secrets.token_hex(32)  # the format of ray._private.authentication.authentication_token_generator
    _write_private(token_path, token)
    environ = _ray_environ(dict(os.environ if base_environ is None else base_environ), token_path)
    dashboard_url = f"http://{LOCALHOST}:{ports['dashboard']}"
    session_ids: list[int] = []
    try:
        _start_nodes(layout, ports, temp_dir, environ, session_ids)
        nodes = _wait_for_nodes(dashboard_url, token, workers + 1, timeout_s)
    except BaseException:
        _stop_processes(temp_dir, session_ids)
        raise
    state = {
        "dir": str(cluster_dir),
        "gcs_address": f"{LOCALHOST}:{ports['gcs']}",
        "dashboard_url": dashboard_url,
        "token_path": str(token_path),
        "temp_dir": temp_dir,
        "logs": f"{temp_dir}/session_latest/logs",
        "session_ids": session_ids,
        "nodes": nodes,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (cluster_dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    _write_env_file(cluster_dir / ENV_FILE, env(cluster_dir))
    return state


def _clear(cluster_dir: Path, temp_dir: str) -> None:
    """Remove what a stopped cluster left: state, env and token files, the Ray temp dir."""
    for name in (STATE_FILE, ENV_FILE, TOKEN_FILE):
        (cluster_dir / name).unlink(missing_ok=True)
    shutil.rmtree(temp_dir, ignore_errors=True)


def down(cluster_dir: str | Path) -> None:
    """Stop every process of the cluster in `cluster_dir` and remove its files and Ray temp dir; fine when stopped."""
    cluster_dir = Path(cluster_dir).resolve()
    state = read_state(cluster_dir) or {}
    temp_dir = state.get("temp_dir") or ray_temp_dir(cluster_dir)
    _stop_processes(temp_dir, state.get("session_ids", []))
    _clear(cluster_dir, temp_dir)


def status(cluster_dir: str | Path) -> dict | None:
    """What runs of the cluster in `cluster_dir`, or None when nothing does.

    Returns {"running", "dashboard_url", "dashboard_ok", "gcs_address", "temp_dir", "processes", "nodes"}; running
    means the dashboard answers and the head node is alive. Nodes come from the dashboard (empty when it is down).
    """
    cluster_dir = Path(cluster_dir).resolve()
    state = read_state(cluster_dir)
    temp_dir = state["temp_dir"] if state else ray_temp_dir(cluster_dir)
    pids = cluster_pids(temp_dir, state["session_ids"] if state else [])
    if not pids:
        return None
    if state is None:
        return {
            "running": False,
            "dashboard_ok": False,
            "temp_dir": temp_dir,
            "processes": len(pids),
            "nodes": [],
            "dashboard_url": None,
            "gcs_address": None,
        }
    token = Path(state["token_path"]).read_text().strip()
    dashboard_ok = _dashboard_answers(state["dashboard_url"], token)
    try:
        nodes = _list_nodes(state["dashboard_url"], token) if dashboard_ok else []
    except (urllib.error.URLError, OSError, ValueError, RuntimeError) as e:
        logger.warning("the dashboard answers but listing the nodes failed: %s", e)
        nodes = []
    return {
        "running": dashboard_ok and any(n["is_head"] and n["alive"] for n in nodes),
        "dashboard_url": state["dashboard_url"],
        "dashboard_ok": dashboard_ok,
        "gcs_address": state["gcs_address"],
        "temp_dir": temp_dir,
        "processes": len(pids),
        "nodes": nodes,
    }


# ----------------------------------------------------------------------------------------------- command line


def _format_node(node: dict) -> str:
    role = "head  " if node["is_head"] else "worker"
    extra = ", ".join(f"{k}={v:g}" for k, v in sorted(node["resources"].items()))
    return (
        f"  {role} {'alive' if node['alive'] else 'DEAD '} {node['node_ip']} {node['node_id'][:12]}  "
        f"CPU={node['cpus']:g} GPU={node['gpus']:g}" + (f"  {extra}" if extra else "")
    )


def _print_up(state: dict) -> None:
    cluster_dir = state["dir"]
    cpus = sum(n["cpus"] for n in state["nodes"])
    print(f"Ray cluster up: 1 head + {len(state['nodes']) - 1} workers, {cpus:g} CPUs, token auth on")
    for node in state["nodes"]:
        print(_format_node(node))
    print(f"  GCS        {state['gcs_address']}")
    print(f"  dashboard  {state['dashboard_url']}  (127.0.0.1 only; needs the token)")
    print(f"  token      {state['token_path']}")
    print(f"  logs       {state['logs']}")
    print("Next:")
    print(f"  source {cluster_dir}/{ENV_FILE}")
    print("  ray job submit --runtime-env cluster/runtime_env.yaml -- python -m jobs.infer ...")
    print(f"  python -m cluster.local down --dir {cluster_dir}")


def _print_status(cluster_dir: Path, info: dict | None) -> None:
    if info is None:
        print(f"no cluster running for {cluster_dir}")
        return
    print(f"cluster of {cluster_dir}: {'running' if info['running'] else 'NOT running'}, {info['processes']} processes")
    answer = "answers" if info["dashboard_ok"] else "does NOT answer"
    print(f"  dashboard {info['dashboard_url']} {answer}; GCS {info['gcs_address']}; temp dir {info['temp_dir']}")
    for node in info["nodes"]:
        print(_format_node(node))


def _parse_resources(text: str) -> dict[str, float]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"accel\": 1}}', got {text!r}: {e}") from e
    if not isinstance(value, dict) or not all(isinstance(v, (int, float)) for v in value.values()):
        raise argparse.ArgumentTypeError(f"expected a JSON object of resource name -> number, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cluster.local", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    default_dir = os.environ.get(DIR_ENV_VAR, DEFAULT_DIR)
    commands = {
        "up": sub.add_parser("up", help="start a head and N workers"),
        "down": sub.add_parser("down", help="stop the cluster's processes and remove its files"),
        "status": sub.add_parser("status", help="print the nodes; exit 0 if running, 1 if not"),
    }
    for command in commands.values():
        command.add_argument(
            "--dir", default=default_dir, help=f"cluster folder (default ${DIR_ENV_VAR} or {DEFAULT_DIR})"
        )
    start = commands["up"]
    start.add_argument("--workers", type=int, default=0, help="worker nodes besides the head (default 0)")
    start.add_argument("--head-cpus", type=int, default=None, help="CPUs of the head (default: all of the machine's)")
    start.add_argument("--worker-cpus", type=int, default=1, help="CPUs of each worker (default 1)")
    start.add_argument("--head-gpus", type=int, default=None, help="GPUs of the head (default: what Ray detects)")
    start.add_argument("--worker-gpus", type=int, default=0, help="GPUs of each worker (default 0)")
    start.add_argument(
        "--worker-resources", type=_parse_resources, default=None, help="custom resources of each worker, JSON"
    )
    start.add_argument("--port", type=int, default=None, help="GCS port (default: a free one)")
    start.add_argument("--dashboard-port", type=int, default=None, help="dashboard port (default: a free one)")
    start.add_argument("--object-store-mb", type=int, default=None, help="object store per node, MiB (default: Ray's)")
    start.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for all nodes (default 60)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "up":
        try:
            state = up(
                args.dir,
                workers=args.workers,
                head_cpus=args.head_cpus,
                worker_cpus=args.worker_cpus,
                head_gpus=args.head_gpus,
                worker_gpus=args.worker_gpus,
                worker_resources=args.worker_resources,
                port=args.port,
                dashboard_port=args.dashboard_port,
                object_store_memory=args.object_store_mb * 2**20 if args.object_store_mb else None,
                timeout_s=args.timeout,
            )
        except (RuntimeError, TimeoutError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        _print_up(state)
        return 0
    if args.command == "down":
        down(args.dir)
        print(f"cluster of {Path(args.dir).resolve()} is down")
        return 0
    info = status(args.dir)
    _print_status(Path(args.dir).resolve(), info)
    return 0 if info and info["running"] else 1


if __name__ == "__main__":
    sys.exit(main())

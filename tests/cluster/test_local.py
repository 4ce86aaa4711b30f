"""cluster.local on a real two-node cluster (head 1 CPU + worker 1 CPU), token auth on; one cluster for the module.

Clients are subprocesses: a Ray client is process-global, and the token must come from their environment.
"""

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cluster import local

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="cluster.local needs Linux /proc")

WORKER_RESOURCE = "test_worker_slot"
CLIENT_TIMEOUT_S = 120


def _client_environ(extra: dict[str, str], home: Path) -> dict[str, str]:
    """This environment minus every Ray address/auth variable, plus `extra`; HOME without ~/.ray/auth_token."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    environ.update(HOME=str(home), RAY_NUM_REDIS_GET_RETRIES="3", PYTHONPATH=str(Path(local.__file__).parents[1]))
    environ.update(extra)
    return environ


def _run_client(code: str, environ: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S, check=False
    )


@pytest.mark.parametrize(
    "options, message",
    [
        ({"workers": -1}, "integers >= 0"),
        ({"head_cpus": 1.5}, "integers >= 0"),
        ({"worker_resources": {"GPU": 1}}, "cannot be custom resources"),
    ],
)
def test_up_rejects_bad_options_before_starting_anything(options, message, tmp_path):
    """A bad option fails at once with what is allowed, and nothing is started."""
    with pytest.raises(ValueError, match=message):
        local.up(tmp_path / "c", **options)
    assert not local.cluster_pids(local.ray_temp_dir(tmp_path / "c"))


def test_up_rejects_a_port_in_use_at_once(tmp_path):
    """`ray start` on a taken GCS port only fails after ~40 s; up checks first and names the port."""
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"gcs port {port} is not free"):
            local.up(tmp_path / "c", port=port)


@pytest.fixture(scope="module")
def running():
    """A started cluster: (cluster dir, cluster.json content, an empty HOME for clients). Always torn down."""
    cluster_dir = Path(tempfile.mkdtemp(prefix="rpl-test-", dir="/tmp"))
    home = Path(tempfile.mkdtemp(prefix="rpl-home-", dir="/tmp"))
    try:
        state = local.up(
            cluster_dir,
            workers=1,
            head_cpus=1,
            worker_cpus=1,
            worker_resources={WORKER_RESOURCE: 2},
            object_store_memory=100 * 2**20,
            timeout_s=90,
        )
        yield cluster_dir, state, home
    finally:
        local.down(cluster_dir)
        shutil.rmtree(cluster_dir, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


def test_status_shows_the_head_and_the_worker_with_the_cpus_asked(running, capsys):
    """Both raylets joined one cluster with their own CPU counts and resources, and the CLI says 'running' (exit 0)."""
    cluster_dir, _, _ = running
    info = local.status(cluster_dir)
    assert info["running"] and info["dashboard_ok"]
    nodes = info["nodes"]
    assert [n["is_head"] for n in nodes] == [True, False] and all(n["alive"] for n in nodes)
    head, worker = nodes
    assert (head["cpus"], head["gpus"], head["resources"]) == (1, 0, {})
    assert (worker["cpus"], worker["gpus"], worker["resources"]) == (1, 0, {WORKER_RESOURCE: 2})
    assert local.main(["status", "--dir", str(cluster_dir)]) == 0
    assert "running" in capsys.readouterr().out


def test_files_of_the_cluster_dir(running):
    """The token is private (0600) and in Ray's format; `env` holds exactly what env() returns."""
    cluster_dir, state, _ = running
    token_path = Path(state["token_path"])
    assert stat.S_IMODE(token_path.stat().st_mode) == 0o600
    token = token_path.read_text()
    assert len(token) == 64 and int(token, 16) >= 0
    exported = dict(
        line.removeprefix("export ").replace("'", "").split("=", 1)
        for line in (cluster_dir / "env").read_text().splitlines()
        if line.startswith("export ")
    )
    assert exported == local.env(cluster_dir)
    assert json.loads((cluster_dir / "cluster.json").read_text()) == state
    assert len(state["temp_dir"]) < 30, "unix socket paths under the temp dir must stay short"


def test_up_refuses_a_cluster_that_is_already_running(running):
    """A second `up` must not start a second head on the same temp dir, nor touch the running one."""
    cluster_dir, _, _ = running
    with pytest.raises(RuntimeError, match="already running"):
        local.up(cluster_dir, workers=1)
    assert local.status(cluster_dir)["running"]


def test_a_client_with_the_token_runs_a_task_on_the_worker(running):
    """env(dir) is all a client needs: ray.init() reaches the GCS and a task lands on the worker node."""
    cluster_dir, state, home = running
    code = (
        "import ray\n"
        "ray.init(log_to_driver=False)\n"
        f"f = ray.remote(resources={{'{WORKER_RESOURCE}': 1}})(lambda: ray.get_runtime_context().get_node_id())\n"
        "print('NODE', ray.get(f.remote()))\n"
    )
    result = _run_client(code, _client_environ(local.env(cluster_dir), home))
    assert result.returncode == 0, result.stderr[-3000:]
    worker = next(n for n in state["nodes"] if not n["is_head"])
    assert f"NODE {worker['node_id']}" in result.stdout


def test_every_node_has_its_own_dashboard_agent(running):
    """Each raylet's dashboard agent serves HTTP on its own port (Ray's fixed default, 52365, would let only the
    first raylet of the machine bind it; the others then run silently without it)."""
    cluster_dir, state, home = running
    code = (
        "import json, ray\n"
        "from ray.experimental.internal_kv import _internal_kv_get\n"
        "ray.init(log_to_driver=False)\n"
        "key = lambda n: ('DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX:' + n['NodeID']).encode()\n"
        "print('AGENTS', json.dumps({n['NodeID']: json.loads(_internal_kv_get(key(n), namespace=b'dashboard') or 'null')\n"
        "                            for n in ray.nodes() if n['Alive']}))\n"
    )
    result = _run_client(code, _client_environ(local.env(cluster_dir), home))
    assert result.returncode == 0, result.stderr[-3000:]
    agents = json.loads(result.stdout.split("AGENTS ", 1)[1])
    assert set(agents) == {n["node_id"] for n in state["nodes"]}
    assert all(agents.values()), (
        f"nodes whose agent registered no HTTP server: {[n for n, a in agents.items() if not a]}"
    )
    ports = [http_port for _, http_port, _ in agents.values()]
    assert len(set(ports)) == len(ports) and all(p > 0 for p in ports), f"agent HTTP ports: {ports}"
    token = Path(state["token_path"]).read_text()
    for ip, http_port, _ in agents.values():
        request = urllib.request.Request(
            f"http://{ip}:{http_port}/api/local_raylet_healthz", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200


@pytest.mark.parametrize("auth", ["no token", "wrong token"])
def test_a_client_without_the_right_token_is_refused(running, auth, tmp_path):
    """Token auth is really on: the GCS refuses a client with no token or another one (AuthenticationError)."""
    _, state, home = running
    extra = {}
    if auth == "wrong token":
        wrong = tmp_path / "token"
        wrong.write_text("0" * 64)
        extra = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(wrong)}
    code = f"import ray\nray.init(address={state['gcs_address']!r}, log_to_driver=False)\nprint('CONNECTED')\n"
    result = _run_client(code, _client_environ(extra, home))
    assert result.returncode != 0 and "CONNECTED" not in result.stdout
    assert "AuthenticationError" in result.stderr and "Authentication token is missing or incorrect" in result.stderr


def test_the_dashboard_wants_the_token(running):
    """The dashboard (job submission) answers 401 without a token and 403 with a wrong one."""
    _, state, _ = running
    url = f"{state['dashboard_url']}/api/jobs/"
    for headers, code in (({}, 401), ({"Authorization": "Bearer " + "0" * 64}, 403)):
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10)
        assert error.value.code == code


@pytest.mark.slow
def test_down_stops_this_cluster_only(running, capsys):
    """down kills every process of the cluster (retitled ray:: ones too) and nothing else; it is idempotent.

    The bystander looks like another cluster's raylet (a ray path, another temp dir): a too-broad match kills it.
    Runs last in this module: it stops the shared cluster.
    """
    cluster_dir, state, _ = running
    bystander = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; time.sleep(300)",
            "/x/ray/core/src/ray/raylet/raylet",
            "--temp_dir=/tmp/rpl-00000000",
        ]
    )
    try:
        before = local.cluster_pids(state["temp_dir"], state["session_ids"])
        titles = [local._read_proc(pid).cmdline for pid in before]
        assert any(t.startswith("ray::") for t in titles), "expected agents/workers with rewritten titles"
        assert bystander.pid not in before

        local.down(cluster_dir)

        alive = local._live_processes()
        assert not set(before) & set(alive), "processes of the cluster survived down"
        assert not [p for p in alive.values() if state["temp_dir"] in p.cmdline]
        assert not [p for p in alive.values() if p.sid in state["session_ids"]]
        assert bystander.poll() is None, "down killed a process of another cluster"
    finally:
        bystander.kill()
        bystander.wait()
    assert not Path(state["temp_dir"]).exists()
    assert not (cluster_dir / "cluster.json").exists() and not (cluster_dir / "auth_token").exists()
    assert local.status(cluster_dir) is None
    assert local.main(["status", "--dir", str(cluster_dir)]) == 1
    local.down(cluster_dir)  # idempotent
    capsys.readouterr()

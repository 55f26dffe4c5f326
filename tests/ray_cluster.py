"""A Ray cluster of real `ray start` processes on this machine: a head and worker nodes that share
no disk with the test, each with its own CPUs and a custom resource naming it.

Every node runs ``ray start --block``. A worker node runs in a mount namespace of its own
(``unshare``) in which the machine's temporary directories (``/tmp`` and the test's, where pytest's
``tmp_path``, the `magnet` command's working directory and the head's files live) are empty tmpfs
mounts: its Ray temp dir and ``TMPDIR`` are there, and it cannot read or write a file of the test,
of the head or of another node, as on separate machines; what it needs comes over the network
(the object store, MLflow) or with the installed code. ``kill(name)`` SIGKILLs the node's every
process (``ray start``, raylet, agents and the workers the raylet started in sessions of their own)
at once, so its disk goes with it: a machine lost with no clean shutdown.

The cluster uses token authentication with a token of its own (``RAY_AUTH_MODE=token``,
``RAY_AUTH_TOKEN``; ``env`` holds what a client needs), never ``~/.ray/auth_token``, which other
Ray instances on the machine share. The test process is a Ray client of the cluster meanwhile, to
read its nodes (``ray.nodes()``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import psutil
from ports import HOST, free_port

RAY = str(Path(sys.executable).with_name("ray"))
# The GCS declares a node dead after health_check_failure_threshold missed checks of
# health_check_period_ms: 15 s by default, 5 s here, so that a lost node is noticed quickly (not
# quicker: a raylet on a loaded 2-core machine may miss a check or two without being lost).
# Starting Python processes on such a machine can take minutes: the raylet waits that long for
# its agent, and for the workers it starts, instead of 30 and 60 s.
NODE_SETTINGS = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_failure_threshold": "5",
    "RAY_agent_register_timeout_ms": "300000",
    "RAY_worker_register_timeout_seconds": "300",
}
START_ATTEMPTS = 3
START_TIMEOUT_S = 600  # a node starts in seconds on an idle machine, in minutes on a loaded one
OBJECT_STORE_BYTES = 100 * 2**20  # Ray's minimum is 75 MiB; the default, 30% of memory per node


def _private_disk(hidden: list[Path], temp_dir: Path) -> list[str]:
    """The command prefix that runs a program in a mount namespace of its own where each of
    ``hidden`` is an empty tmpfs and ``temp_dir`` (inside one of them) exists. As root, or as a
    user in a user namespace of their own where the system allows it."""
    mounts = " && ".join(f"mount -t tmpfs magnet-node {path}" for path in hidden)
    script = f'{mounts} && mkdir -p {temp_dir}/tmp && exec "$@"'
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return ["unshare", *user, "--mount", "--propagation", "private", "sh", "-c", script, "node"]


def hidden_dirs(*also: Path) -> list[Path]:
    """/tmp, this process's temporary directory and ``also``, without those inside another."""
    paths = sorted(
        {Path("/tmp").resolve(), Path(tempfile.gettempdir()).resolve(), *(p.resolve() for p in also)}
    )
    return [p for p in paths if not any(p != q and p.is_relative_to(q) for q in paths)]


@dataclass
class Node:
    """One `ray start --block` process and everything it started."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    process: subprocess.Popen | None = None
    starts: int = 0

    def start(self) -> None:
        """Start (or, after a failed start, start again) the node's `ray start`."""
        self.starts += 1
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip

    def failed_start(self) -> bool:
        """Whether `ray start` exited; starting it again when it may (START_ATTEMPTS), else raising.
        On a loaded machine a raylet gives up on its agents after 20 s, a limit Ray does not let
        one raise: a new start usually gets through."""
        if self.process is None or self.process.poll() is None:
            return False
        if self.starts >= START_ATTEMPTS:
            raise RuntimeError(
                f"node {self.name} did not start ({self.process.returncode}):\n{_tail(self.log)}"
            )
        self.start()
        return True

    def processes(self) -> list[psutil.Process]:
        """The node's processes: `ray start` and its descendants (Ray's workers call setsid, so
        they leave the process group but stay the raylet's children)."""
        try:
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        except (psutil.NoSuchProcess, AttributeError):
            return []

    def kill(self) -> None:
        """SIGKILL every process of the node at once."""
        everyone = self.processes()
        for process in everyone:  # stopped first: none restarts or reports a sibling meanwhile
            with contextlib.suppress(psutil.NoSuchProcess):
                process.suspend()
        for process in everyone:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(everyone, timeout=30)
        if self.process is not None:
            self.process.wait()


@dataclass
class RayCluster:
    """A running head and its worker nodes."""

    root: Path
    address: str
    env: dict[str, str]  # what a client needs: RAY_ADDRESS and the token
    node_env: dict[str, str]
    hidden: list[Path]
    nodes: dict[str, Node] = field(default_factory=dict)
    # a worker node's IP: one of the loopback's own per node (Ray Train tells nodes apart by IP)
    addresses: dict[str, str] = field(default_factory=dict)

    def start_worker(self, name: str, num_cpus: int = 1) -> Node:
        """Start worker node ``name`` (``num_cpus`` CPUs, resource ``name`` = 1, a disk and an IP
        address of its own, 127.0.0.2 and on); ``wait_for_nodes`` waits until it has joined."""
        temp_dir = Path("/tmp") / f"ray-{name}"
        ip = self.addresses.setdefault(name, f"127.0.0.{len(self.addresses) + 2}")
        argv = [
            *_private_disk(self.hidden, temp_dir),
            *_ray_start(temp_dir, {name: 1}),
            "--address", self.address, "--num-cpus", str(num_cpus), "--node-ip-address", ip,
        ]  # fmt: skip
        env = {**self.node_env, "TMPDIR": str(temp_dir / "tmp")}
        self.nodes[name] = Node(name, argv, env, self.root / f"{name}.log")
        self.nodes[name].start()
        return self.nodes[name]

    def kill(self, name: str) -> None:
        """SIGKILL every process of worker node ``name`` at once; its tmpfs disk goes with them."""
        self.nodes.pop(name).kill()

    def replace(self, name: str) -> str:
        """Lose worker node ``name`` (``kill``) and start a node of that name in its place; returns
        once the cluster has declared the lost node dead and the new one joined: its node id."""
        lost = self.alive()[name]
        self.kill(name)
        self.start_worker(name)
        self.wait_for_nodes(
            lambda live: lost not in {node_id for _, node_id in live} and name in {n for n, _ in live},
            f"node {name} {lost} to be declared dead and a new {name} to join",
        )
        return self.alive()[name]

    def alive(self) -> dict[str, str]:
        """Node id (hex) of each live node by name, once the cluster has settled (``replace``)."""
        return dict(self._live())

    def _live(self) -> list[tuple[str, str]]:
        """(name, node id) of each live node: named by its custom resource, or ``head``. Two share
        a name while a lost node is not yet declared dead and its replacement has joined."""
        import ray

        live = []
        for node in ray.nodes():
            if node["Alive"]:
                named = [key for key in node["Resources"] if key in self.nodes and key != "head"]
                live.append((named[0] if named else "head", node["NodeID"]))
        return live

    def wait_for_nodes(
        self,
        condition: Callable[[list[tuple[str, str]]], bool],
        what: str,
        timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        """Poll the live nodes (``_live``) until ``condition`` holds, starting again a node whose
        start failed."""
        deadline = time.monotonic() + timeout_s
        while not condition(self._live()):
            for node in self.nodes.values():
                node.failed_start()
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}: {self._live()}")
            time.sleep(0.2)


def _ray_start(temp_dir: Path, resources: Mapping[str, float]) -> list[str]:
    return [
        RAY, "start", "--block", "--disable-usage-stats",
        "--temp-dir", str(temp_dir), "--object-store-memory", str(OBJECT_STORE_BYTES),
        "--resources", json.dumps(dict(resources)),
    ]  # fmt: skip


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else ""


@contextlib.contextmanager
def ray_cluster(
    root: Path, workers: Mapping[str, int], extra_env: Mapping[str, str] = MappingProxyType({})
) -> Iterator[RayCluster]:
    """A head with no CPUs (it only schedules: drivers attach to it, Train controllers and Tune's
    trial drivers live there) and a worker node per entry of ``workers`` (name -> CPUs), all on
    127.0.0.1; ``extra_env`` is added to every node's environment. The test process is a Ray client
    of the cluster while it runs."""
    import ray
    from ray._private.authentication_test_utils import reset_auth_token_state

    root.mkdir(parents=True, exist_ok=True)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    port = free_port()
    address = f"{HOST}:{port}"
    cluster = RayCluster(
        root=root,
        address=address,
        env={**auth, "RAY_ADDRESS": address},
        node_env={**os.environ, **extra_env, **auth, **NODE_SETTINGS},
        hidden=hidden_dirs(root),
    )
    saved = {name: os.environ.get(name) for name in auth}
    try:
        head = [*_ray_start(root / "head", {}), "--head", "--port", str(port), "--num-cpus", "0"]
        cluster.nodes["head"] = Node(
            "head", [*head, "--include-dashboard", "false"], cluster.node_env, root / "head.log"
        )
        cluster.nodes["head"].start()
        os.environ.update(auth)
        reset_auth_token_state()  # Ray read the mode and token when it was imported
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                ray.init(address=address, log_to_driver=False)
                break
            except ConnectionError:
                cluster.nodes["head"].failed_start()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the head did not start:\n{_tail(root / 'head.log')}") from None
                time.sleep(0.5)
        for name, cpus in workers.items():
            cluster.start_worker(name, cpus)
        cluster.wait_for_nodes(
            lambda live: set(workers) <= {n for n, _ in live}, f"nodes {', '.join(workers)}"
        )
        yield cluster
    finally:
        ray.shutdown()
        for node in reversed(list(cluster.nodes.values())):
            node.kill()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        reset_auth_token_state()

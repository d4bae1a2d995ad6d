"""The README's "Many workers" recipe, run as written, one host per network namespace.

Each line of the recipe's block runs with ``sh -c`` in a shared directory (the
hosts share the file system: the token file is "copied" to every host), on the
host whose address it names: the scheduler's host 10.0.0.2, the worker's
10.0.0.3; the lines that name no listener of their own (the token, the status
and the task) run on a third host, 10.0.0.4, a client elsewhere on the LAN.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.netns import Topology, require_netns
from tests.processes import REPO, Proc, child_env
from tests.waiting import until

README = REPO / "README.md"


def recipe() -> list[str]:
    """The command lines of the README's "Many workers" block, comments dropped."""
    text = README.read_text()
    section = text[text.index("## Many workers") :]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None
    lines = []
    for line in block.group(1).splitlines():
        command = line.split("  #", 1)[0].strip()
        if command:
            lines.append(command)
    return lines


def env() -> dict[str, str]:
    """The tests' environment, with ``vaccelray`` (this interpreter's) on the PATH."""
    base = child_env()
    base["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), base.get("PATH", "")])
    for name in ("VACCELRAY_TOKEN", "VACCELRAY_ADDRESS"):
        base.pop(name, None)
    return base


def test_the_many_workers_recipe_runs_a_task_as_written(tmp_path: Path) -> None:
    require_netns()
    lines = recipe()
    assert [line.split()[:2] for line in lines[1:]] == [
        ["vaccelray", "worker"],
        ["vaccelray", "scheduler"],
        ["vaccelray", "status"],
        ["vaccelray", "submit"],
    ]
    make_token, worker_line, scheduler_line, status_line, submit_line = lines
    with Topology(3, subnet=0) as topo:
        scheduler_host, worker_host, client_host = topo.hosts
        assert topo.addresses == ["10.0.0.2", "10.0.0.3", "10.0.0.4"]
        assert "tcp://10.0.0.3:" in worker_line
        assert "tcp://10.0.0.2:" in scheduler_line

        def run(line: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["ip", "netns", "exec", client_host, "sh", "-c", line],
                cwd=tmp_path,
                env=env(),
                capture_output=True,
                text=True,
                timeout=120,  # liveness only
                check=False,
            )

        made = run(make_token)
        assert made.returncode == 0, made.stderr
        assert (tmp_path / "token").stat().st_mode & 0o077 == 0
        daemons = [
            Proc(["sh", "-c", f"cd {tmp_path} && exec {line}"], netns=host, env=env())
            for line, host in ((worker_line, worker_host), (scheduler_line, scheduler_host))
        ]
        try:
            for daemon in daemons:
                daemon.wait_for(r"Listening on tcp://10\.0\.0\.")
            # The scheduler finds the worker with zeroconf: status lists it once it has.
            until(
                lambda: "10.0.0.3:8194" in run(status_line).stdout,
                "the scheduler lists the worker (found with zeroconf)",
            )
            done = run(submit_line)
            assert done.returncode == 0, done.stderr
            assert done.stdout.strip() == "5"
            # Without the token the client is refused by the scheduler, which says so.
            refused = run(submit_line.replace(" --token-file token", ""))
            assert refused.returncode == 1
            assert "refused: scheduler tcp://10.0.0.2:8190: the cluster token is required" in (
                refused.stderr
            )
        finally:
            for daemon in daemons:
                daemon.stop()
        assert "Registered function add" in daemons[1].text()

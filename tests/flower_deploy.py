"""Flower's deployment runtime for tests: a real SuperLink, SuperNodes, and runs submitted as `flwr run` does.

Every Flower process runs this interpreter. The SuperLink and SuperNodes start their SuperExec, ServerApp and
ClientApp processes by command name (flower-superexec, flwr-serverapp, flwr-clientapp) from PATH, so PATH
starts with copies of Flower's console scripts bound to sys.executable: a test run from a venv would otherwise
run the apps with whatever fedtiny another interpreter on PATH has installed.

Runs are submitted, listed and their logs read with the real `flwr` command (`flwr run`, `flwr ls`, `flwr log`)
from a CLI environment of its own, as docs/deployment.md tells operators to: the environment fedtiny is
installed in has typer 0.15.4 (amqtt pins it), whose parser cannot read flwr 1.42's CLI. The CLI environment is
a venv that sees this interpreter's packages but has its own typer (`cli_environment`); FLWR_HOME names the
SuperLink connection "local".
"""

import json
import os
import re
import site
import socket
import subprocess
import sys
import textwrap
import time
from importlib.metadata import entry_points
from pathlib import Path

from fedtiny.protocol.brokers import free_port

FLWR_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
CLI_TYPER = "typer>=0.16,<0.21"  # flwr 1.42's range, from the first release that parses its Literal options


def cli_environment(folder: Path) -> Path:
    """The python of a venv in `folder` that sees this interpreter's packages (flwr among them) but has its own
    typer. Raises RuntimeError when typer cannot be installed (no package index).

    Not `venv --system-site-packages`: that shows the packages of the *base* interpreter, which are not this
    interpreter's when the tests run in a virtual environment (flwr was missing there, or another version).
    Instead a .pth file in the venv calls site.addsitedir on each of this interpreter's site directories, so
    their own .pth files (editable installs) work too. They come after the venv's site-packages on sys.path,
    so the venv's typer wins. typer goes in first, alone and with --no-deps: its dependencies are this
    interpreter's (flwr needs them too), and pip never sees, let alone uninstalls, this interpreter's typer.
    """
    python = folder / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, capture_output=True, timeout=600)
        done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", CLI_TYPER],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"cannot install {CLI_TYPER} for the flwr CLI:\n{done.stderr[-2000:]}")
        purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 check=True, capture_output=True, text=True, timeout=60).stdout.strip()
        (Path(purelib) / "running_interpreter.pth").write_text(
            "".join(f"import site; site.addsitedir({d!r})\n" for d in _site_directories()))
    return python


def _site_directories() -> list[str]:
    """This interpreter's site directories: a venv's own, and its base's when the venv includes those."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        dirs.append(site.getusersitepackages())
    return dirs


def config_args(values: dict) -> str:
    """A --node-config / --run-config string: key=value pairs, TOML values."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def toml_table(name: str, values: dict) -> str:
    """One flat TOML table (str, int, float, bool and lists of them: their JSON form is valid TOML)."""
    return f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())


def _console_scripts(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for ep in entry_points(group="console_scripts"):
        if ep.value.startswith("flwr."):
            module, attr = ep.value.split(":")
            script = folder / ep.name
            script.write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import {attr}\nsys.exit({attr}())\n")
            script.chmod(0o755)


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"port {port} not listening:\n{log.read_text()[-3000:]}")


class FlowerDeployment:
    """A SuperLink and SuperNodes in `folder` (their logs are folder/*.log); stop them with close()."""

    def __init__(self, folder: Path, cli_python: Path) -> None:
        self.folder = folder
        self.cli_python = cli_python
        self.bin = folder / "bin"
        _console_scripts(self.bin)
        self.env = {**os.environ, **FLWR_ENV, "PYTHONUNBUFFERED": "1",
                    "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.procs: list[tuple[subprocess.Popen, object]] = []
        self.port: int | None = None

    def __enter__(self) -> "FlowerDeployment":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _spawn(self, name: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
        log = self.folder / f"{name}.log"
        out = log.open("wb")
        proc = subprocess.Popen([str(self.bin / args[0]), *args[1:]],
                                env={**self.env, "FLWR_HOME": str(self.folder / f"home-{name}")},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((proc, out))
        return proc, log

    def superlink(self) -> int:
        """Start the SuperLink (insecure, on loopback); returns its Fleet API port."""
        self.port = free_port()
        proc, log = self._spawn("superlink", [
            "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
            "--database", str(self.folder / "superlink.db"), "--disable-runtime-dependency-installation"])
        _wait_port(self.port, proc, log)
        home = self.folder / "home-cli"
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text(textwrap.dedent(f'''\
            [superlink]
            default = "local"

            [superlink.local]
            address = "127.0.0.1:{self.port}"
            insecure = true
            '''))
        return self.port

    def supernode(self, name: str, node_config: dict) -> None:
        self._spawn(f"supernode-{name}", [
            "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}", "--port", str(free_port()),
            "--node-config", config_args(node_config)])

    def flwr(self, *args: str) -> str:
        """The `flwr` command with these arguments, in the CLI environment; its stdout."""
        done = subprocess.run([str(self.cli_python), "-c", "import sys; from flwr.cli.app import app; sys.exit(app())",
                               *args], capture_output=True, text=True, timeout=300,
                              env={**self.env, "FLWR_HOME": str(self.folder / "home-cli")})
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def submit(self, app_dir: Path, run_config: dict | None = None) -> int:
        """`flwr run APP local [--run-config ...]`; returns the run id."""
        out = self.flwr("run", str(app_dir), "local", *(["--run-config", config_args(run_config)] if run_config else []))
        found = re.search(r"Successfully started run (\d+)", out)
        assert found, out
        return int(found.group(1))

    def run_status(self, run_id: int) -> tuple[str, str]:
        """(status, details) from `flwr ls local --run-id RUN --format json`, e.g. ("finished:completed", "")."""
        (run,) = json.loads(self.flwr("ls", "local", "--run-id", str(run_id), "--format", "json"))["runs"]
        return run["status"], run["status-details"]

    def run_log(self, run_id: int) -> str:
        """`flwr log RUN local --show`: the ServerApp's stdout and stderr, as Flower collected them."""
        return self.flwr("log", str(run_id), "local", "--show")

    def wait(self, done, what: str, timeout: float = 300.0, every: float = 0.2) -> None:
        """Until done() is true; fails with the logs if a process died or the time ran out. The timeout only bounds
        a hang: each `flwr-serverapp` / `flwr-clientapp` process imports Flower and torch anew, and two sites'
        rounds took more than 90 s on a 2-core machine at a load of 15 (the run was still progressing)."""
        end = time.monotonic() + timeout
        while not done():
            for proc, _ in self.procs:
                assert proc.poll() is None, f"a Flower process exited while waiting for {what}:\n{self.logs()}"
            assert time.monotonic() < end, f"timed out waiting for {what}:\n{self.logs()}"
            time.sleep(every)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
                         for p in sorted(self.folder.glob("*.log")))

    def close(self) -> None:
        for proc, out in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
                    proc.wait(10)
            out.close()
        self.procs.clear()

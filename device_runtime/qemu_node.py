"""A firmware node under QEMU (mps2-an386, Cortex-M4F): started, killed as a power cut would, started again.

    QemuNode(elf, modem_port, workdir)   qemu-system-arm with the firmware; its UART1 connects to the modem
                                         (fedtiny_device.bridge) on 127.0.0.1:modem_port, semihosting on

UART1 is a TCP client of the bridge with `reconnect=1`: QEMU connects before the CPU starts, so no byte of the
boot is lost, and finds the bridge again if the bridge restarts. UART0 (the board's console) goes nowhere; the
firmware prints through semihosting, which goes to QEMU's stdout: `workdir/console.log`, appended across runs.
QEMU runs in `workdir`, so a file the firmware opens through semihosting by a relative name (its flash image,
c/fedtiny_flash_semihost.c) lives there and outlives every kill. `args` are the firmware's semihosting command
line (SYS_GET_CMDLINE; the first is the program name).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

from .cruntime import QEMU_MACHINE

CONSOLE = "console.log"


class QemuNode:
    def __init__(self, elf: str | Path, modem_port: int, workdir: str | Path, *, args: list[str] = (),
                 modem_host: str = "127.0.0.1", extra: list[str] = ()) -> None:
        self.elf = Path(elf).resolve()
        self.modem = (modem_host, int(modem_port))
        self.workdir = Path(workdir)
        self.args = [self.elf.name, *args]
        self.extra = list(extra)
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def command(self) -> list[str]:
        host, port = self.modem
        for arg in self.args:
            if "," in arg:  # QEMU's option syntax would split it
                raise ValueError(f"semihosting argument {arg!r} contains a comma")
        semihosting = ",".join(["enable=on", "target=native"] + [f"arg={a}" for a in self.args])
        return ["qemu-system-arm", "-M", QEMU_MACHINE, "-display", "none", "-monitor", "none",
                "-semihosting-config", semihosting, "-kernel", str(self.elf),
                "-chardev", f"socket,id=modem,host={host},port={port},reconnect=1",
                "-serial", "null", "-serial", "chardev:modem", *self.extra]

    @property
    def console_path(self) -> Path:
        return self.workdir / CONSOLE

    def start(self) -> QemuNode:
        if self.running:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.console_path, "ab") as console:
            console.write(f"--- start {self.starts + 1}\n".encode())
            console.flush()
            self.process = subprocess.Popen(self.command(), cwd=self.workdir, stdin=subprocess.DEVNULL,
                                            stdout=console, stderr=subprocess.STDOUT, start_new_session=True)
        self.starts += 1
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """Power cut: SIGKILL, nothing flushed, the serial connection drops."""
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.process = None

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM (QEMU exits cleanly), SIGKILL after `timeout`; the exit code, or None if it was not running."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return None
        code, self.process = self.process.returncode, None
        return code

    def restart(self) -> QemuNode:
        self.kill()
        return self.start()

    def wait(self, timeout: float | None = None) -> int:
        """The exit code once the firmware ends by itself (semihosting exit)."""
        code = self.process.wait(timeout)
        self.process = None
        return code

    def console(self, run: int | None = None) -> str:
        """What the firmware printed: all runs, or run number `run` (1 = the first start)."""
        text = self.console_path.read_text(errors="replace") if self.console_path.exists() else ""
        if run is None:
            return text
        parts = re.split(r"^--- start (\d+)\n", text, flags=re.M)
        return dict(zip(parts[1::2], parts[2::2])).get(str(run), "")

    def wait_for(self, pattern: str, timeout: float = 30.0, run: int | None = None) -> re.Match:
        """The first match of a regex (multiline) in the console of run `run` (default: the current one); raises
        TimeoutError with the console's tail, or RuntimeError if QEMU exits first."""
        run = self.starts if run is None else run
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.console(run), re.M)
            if match:
                return match
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"qemu exited ({self.process.returncode}):\n{self.console(run)[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {pattern!r} after {timeout} s:\n{self.console(run)[-2000:]}")
            time.sleep(0.05)

    def __enter__(self) -> QemuNode:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()

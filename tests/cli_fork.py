"""Real `selfrepair` processes without a cold start: a fork server with the package imported once.

A test that needs a process of its own (one it SIGKILLs, several that race on a store, readers
beside a writer) would pay an interpreter start and the imports of torch, transformers and
TransformerLens in each (about 6 CPU seconds; a whole core for seconds on the 2-core CI machine).
`ForkServer` starts `python cli_fork.py` once per pytest process (tests/conftest.py: the `forks`
fixture); it imports everything once and runs each command in a child forked from it: a process
of its own, with its own pid, files and signals, that dies alone when killed, started in
milliseconds. `ForkServer.cli(args)` is `selfrepair ARGS`; `ForkServer.python(code, args)` is
`python -c CODE ARGS`. Each returns a `Forked`, used like a `subprocess.Popen`.

The protocol, one JSON line each way:
    {"spawn": {"cli": [args] | "code": str, "args": [...], "env": {...}, "out": path, "err": path}} -> {"pid": n}
    {"poll": pid} -> {"rc": exit code or null}     {"wait": pid} -> {"rc": exit code}
An exit code is the child's status as `subprocess` reports it (-9: SIGKILLed).

The server itself never runs a command: Polars' and torch's thread pools do not survive a
fork, so they are first used in the children (as in tests/store/fault_runner.py).
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
import time
from pathlib import Path


# -- the server ------------------------------------------------------------------------------
def _prepare() -> None:
    """Import what a command imports, so a child starts with it loaded (ray stays out: its
    driver connects in the child that asks for it)."""
    import torch

    torch.set_num_threads(1)
    import transformers  # noqa: F401
    from transformer_lens.model_bridge import TransformerBridge  # noqa: F401

    import selfrepair.analysis
    import selfrepair.cli  # noqa: F401
    import selfrepair.ingest
    import selfrepair.queries
    import selfrepair.store

    for pkg in (selfrepair.ingest, selfrepair.store, selfrepair.queries, selfrepair.analysis):
        for mod in pkgutil.iter_modules(pkg.__path__):
            if mod.name != "ray_pool":
                importlib.import_module(f"{pkg.__name__}.{mod.name}")


def _redirect(fd: int, path: str | None, mode: int) -> None:
    target = os.open(path or os.devnull, mode, 0o644)
    os.dup2(target, fd)
    os.close(target)


def _child(spec: dict) -> None:
    """The forked child: its own stdin/stdout/stderr, the asked environment, the command; exit with its code."""
    code = 0
    try:
        _redirect(0, None, os.O_RDONLY)
        _redirect(1, spec.get("out"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        _redirect(2, spec.get("err"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the child's own standard streams
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        os.environ.update(spec.get("env") or {})
        if "cli" in spec:
            from selfrepair.cli import main

            sys.argv = ["selfrepair", *spec["cli"]]
            main(args=spec["cli"], prog_name="selfrepair")  # click exits with the command's code
        else:
            sys.argv = ["-c", *spec.get("args", [])]
            exec(compile(spec["code"], "<string>", "exec"), {"__name__": "__main__"})
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int | None):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - a child must exit, whatever happened
        import traceback

        traceback.print_exc()
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _status(pid: int, flags: int) -> int | None:
    done, status = os.waitpid(pid, flags)
    return os.waitstatus_to_exitcode(status) if done else None


def serve() -> None:
    _prepare()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if "spawn" in req:
            pid = os.fork()
            if pid == 0:
                _child(req["spawn"])
            answer = {"pid": pid}
        elif "poll" in req:
            answer = {"rc": _status(req["poll"], os.WNOHANG)}
        else:
            answer = {"rc": _status(req["wait"], 0)}
        print(json.dumps(answer), flush=True)
    os._exit(0)  # the session is over: no interpreter teardown (seconds with torch loaded)


# -- the client (in the test process) --------------------------------------------------------
class Forked:
    """A command running in a child of the fork server: `pid`, `poll()`, `wait()`, `send_signal()`,
    `kill()`, `returncode`, and what it wrote (`stdout`, `stderr`) once it has exited."""

    def __init__(self, server: ForkServer, pid: int, out: Path, err: Path):
        self.server, self.pid, self._out, self._err = server, pid, out, err
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server._ask({"poll": self.pid})["rc"]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"selfrepair child {self.pid}", timeout)
            time.sleep(0.01)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        import signal

        self.send_signal(signal.SIGKILL)

    @property
    def stdout(self) -> str:
        return self._out.read_text()

    @property
    def stderr(self) -> str:
        return self._err.read_text()


class ForkServer:
    """The fork server of one pytest process (started on first use, closed at the session's end)."""

    def __init__(self, scratch: Path):
        self.scratch, self.n = scratch, 0
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=Path(__file__).parents[1])
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}, "the fork server did not start"

    def _ask(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the fork server died"
        return json.loads(line)

    def _spawn(self, spec: dict, env: dict | None) -> Forked:
        self.n += 1
        out, err = self.scratch / f"{self.n}.out", self.scratch / f"{self.n}.err"
        pid = self._ask({"spawn": spec | {"env": env or {}, "out": str(out), "err": str(err)}})["pid"]
        return Forked(self, pid, out, err)

    def cli(self, args: list[str], env: dict | None = None) -> Forked:
        """`selfrepair ARGS` in a process of its own (`env`: variables set in it)."""
        return self._spawn({"cli": [str(a) for a in args]}, env)

    def python(self, code: str, args: list[str], env: dict | None = None) -> Forked:
        """`python -c CODE ARGS` in a process of its own."""
        return self._spawn({"code": code, "args": [str(a) for a in args]}, env)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


if __name__ == "__main__":
    serve()

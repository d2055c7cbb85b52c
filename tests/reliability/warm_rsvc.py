"""A warm process that starts `rsvc` runs by fork: each run is its own process, without the start-up.

    python warm_rsvc.py SOCKET_FD

The fault-injection tests start dozens of `rsvc compare` runs and kill most of them; each fresh
interpreter spent about 5 s of CPU importing torch, timm, hydra, h5py, numba and the stages before
doing anything. This process imports them once (after `runtime.configure()`, as the command does),
runs nothing, and forks one child per request. A child is a process like any other: its own pid,
its own stdout/stderr pipes (passed in with the request), the request's working directory and
environment, `rsvc_cli.cli.main` with the request's arguments, the exit code `main` returns (an
uncaught exception: its traceback and 1, as Python does), and SIGKILL kills it with no handler and
no flush. Nothing has run in the parent, so no thread, lock, file or cached state is inherited
beyond the imported modules.

Protocol on the SOCK_SEQPACKET socket: a request is JSON {"number", "args", "cwd", "env",
"killpoint"} with two file descriptors (stdout, stderr); the answers are "started NUMBER PID" and,
when the child ends, "exited PID STATUS" (the raw wait status). The environment variables read when
torch and numba load (thread counts) are the parent's: requests come with the environment this
process was started with.
"""

from __future__ import annotations

import json
import os
import select
import socket
import sys

from rsvc_cli import runtime

runtime.configure()  # before torch loads, as the rsvc command does

import h5py  # noqa: E402,F401
import hydra  # noqa: E402,F401
import numba  # noqa: E402,F401
import timm  # noqa: E402,F401
import torch  # noqa: E402,F401

import rsvc_cli.cli  # noqa: E402
import rsvc_cli.stages.compare  # noqa: E402,F401 (every stage compare runs, and what they import)
from rsvc_cli.algorithms import compiled  # noqa: E402,F401


def _run_child(request: dict, stdout_fd: int, stderr_fd: int) -> None:
    """In the forked child: become the requested run, then exit with its code."""
    import atexit
    import traceback

    os.dup2(stdout_fd, 1)
    os.dup2(stderr_fd, 2)
    os.close(stdout_fd)
    os.close(stderr_fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = ["rsvc", *request["args"]]
    code = 1
    try:
        if request.get("killpoint"):
            import killpoints

            killpoints.arm(*request["killpoint"])
        code = rsvc_cli.cli.main(list(request["args"]))
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    finally:
        atexit._run_exitfuncs()  # logging.shutdown and the libraries' own handlers, as at a normal exit
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed pipe: nothing left to say
                pass
        os._exit(code)


def serve(channel: socket.socket) -> None:
    while True:
        ready, _, _ = select.select([channel], [], [], 0.01)
        while True:  # report every child that ended
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            channel.send(f"exited {pid} {status}".encode())
        if not ready:
            continue
        message, fds, _, _ = socket.recv_fds(channel, 1 << 20, 2)
        if not message:
            return  # the tests are done
        request = json.loads(message)
        pid = os.fork()
        if pid == 0:
            channel.close()
            _run_child(request, *fds)
        for fd in fds:
            os.close(fd)  # the child's copies are the only write ends: EOF when it ends
        channel.send(f"started {request['number']} {pid}".encode())


if __name__ == "__main__":
    serve(socket.socket(fileno=int(sys.argv[1])))

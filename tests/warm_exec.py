"""A warm interpreter for the doc examples: `rankwise ...` commands and Python blocks run in a fork of a process
that imported torch, transformers and peft once, instead of paying those imports (seconds) in each of ~90 fresh
processes.

    python warm_exec.py serve SOCKET                # imports the heavy stack, then serves SOCKET
    python -S warm_exec.py run SOCKET KIND ARGS...  # KIND rankwise: ARGS are rankwise's; python: SCRIPT ARGS...

Each request is one fork: the child takes the client's stdin/stdout/stderr (passed over the socket), its cwd, its
environment and argv, runs the command like a fresh process would (`rankwise.cli.main`, or the script as
__main__), and exits with its status, which the client exits with. A crash, a leak or an exit takes down only that
child. The client uses only the standard library (`-S`: no site-packages), so it starts in milliseconds; when the
server cannot be reached it runs the command cold, exactly as before.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys

_HEADER = struct.Struct("!I")  # payload length
_TIMEOUT_S = 600  # one command, as the doc test allowed each block before
_LISTENER: list[socket.socket] = []  # the server's socket, closed in each child


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("client went away")
        buf += chunk
    return buf


# ----- client --------------------------------------------------------------------------------------------------
def run_client(sock_path: str, kind: str, args: list[str], cold: list[str]) -> int:
    payload = json.dumps({"kind": kind, "args": args, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(sock_path)
    except OSError:
        os.execv(cold[0], cold + args)  # no server: the command as it always ran
    with conn:
        socket.send_fds(conn, [_HEADER.pack(len(payload))], [0, 1, 2])
        conn.sendall(payload)
        reply = b""
        while chunk := conn.recv(64):
            reply += chunk
    return int(reply or b"1")


# ----- server --------------------------------------------------------------------------------------------------
def _warm_up() -> None:
    """What the commands import anyway; fork shares it copy-on-write. Nothing here runs a model or starts a thread
    (forking a process whose OpenMP or tokenizer threads have run is not safe)."""
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import Trainer  # noqa: F401

    import rankwise.cli  # noqa: F401
    import rankwise.exporting  # noqa: F401
    import rankwise.plan  # noqa: F401
    import rankwise.stats  # noqa: F401
    import rankwise.training.run  # noqa: F401
    import rankwise.training.runs  # noqa: F401


def _child(request: dict, fds: list[int]) -> int:
    """In the forked child: become the requested process, run it, return its exit status."""
    import random
    import runpy
    import signal
    import traceback

    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    signal.alarm(_TIMEOUT_S)
    random.seed()  # a fresh process seeds from the OS; the fork would otherwise repeat the server's state
    try:
        import numpy as np

        np.random.seed()
    except ImportError:  # pragma: no cover
        pass
    args = request["args"]
    try:
        if request["kind"] == "rankwise":
            from rankwise.cli import main

            sys.argv = ["rankwise", *args]
            return int(main(args) or 0)
        sys.argv = list(args)
        sys.path[0] = os.path.dirname(os.path.abspath(args[0]))  # as `python SCRIPT` sets it
        runpy.run_path(args[0], run_name="__main__")
        return 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:  # noqa: BLE001 - what an uncaught exception does to a fresh interpreter
        traceback.print_exc()
        return 1


def _serve_one(conn: socket.socket) -> None:
    msg, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
    request = json.loads(_recv_exact(conn, _HEADER.unpack(msg)[0]))
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            conn.close()
            for listener in _LISTENER:
                listener.close()
            code = _child(request, fds)
        finally:
            try:
                import atexit

                atexit._run_exitfuncs()
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    for fd in fds:  # the child holds them now; kept open here, a pipe would never reach end of file
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    conn.sendall(str(code if code >= 0 else 128 - code).encode())


def serve(sock_path: str) -> None:
    _warm_up()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path + ".tmp")
    os.replace(sock_path + ".tmp", sock_path)  # appears only once the imports are done: clients wait for it
    listener.listen(8)
    _LISTENER.append(listener)
    while True:
        conn, _ = listener.accept()
        with conn:
            try:
                _serve_one(conn)
            except ConnectionError:
                pass


def write_shims(bin_dir: str, sock_path: str) -> dict[str, list[str]]:
    """`rankwise` on PATH that goes through the server; returns the command lines for the other kinds."""
    here = os.path.abspath(__file__)
    py = sys.executable
    os.makedirs(bin_dir, exist_ok=True)
    shim = os.path.join(bin_dir, "rankwise")
    with open(shim, "w") as f:
        f.write(f'#!/bin/sh\nexec "{py}" -S "{here}" run "{sock_path}" rankwise "$@"\n')
    os.chmod(shim, 0o755)
    return {"python": [py, "-S", here, "run", sock_path, "python"]}


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:  # run SOCKET KIND ARGS...
        sock, kind, rest = sys.argv[2], sys.argv[3], sys.argv[4:]
        cold = {"rankwise": [os.path.join(os.path.dirname(sys.executable), "rankwise")], "python": [sys.executable]}
        sys.exit(run_client(sock, kind, rest, cold[kind]))

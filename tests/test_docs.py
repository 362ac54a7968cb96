"""Every ```bash and ```python block in README.md and docs/*.md runs, in order, in one temp folder per file.

Blocks fenced as ```sh or ``` (no language), or preceded by `<!-- skip-test -->`, are shown but not run
(`make demo` itself, multi-minute trainings on real data). Each run is checked by its exit status and by the
asserts the examples contain.

Bash blocks run in bash as written; the `rankwise` they call and each Python block run in a fork of one warm
interpreter per test process (warm_exec.py), which behaves like a fresh process without paying the imports of
torch, transformers and peft each time. RANKWISE_DOCS_COLD=1 runs every command in a fresh process instead.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK_RE = re.compile(r"(<!-- skip-test -->\s*\n)?```(bash|python)\n(.*?)```", re.S)
WARM = Path(__file__).with_name("warm_exec.py")


def blocks(path: Path) -> list[tuple[str, str]]:
    return [(m.group(2), m.group(3)) for m in BLOCK_RE.finditer(path.read_text()) if not m.group(1)]


def _env(extra_path: list[str]) -> dict:
    path = os.pathsep.join([*extra_path, str(Path(sys.executable).parent), os.environ["PATH"]])
    return dict(os.environ, HF_HUB_OFFLINE="1", PATH=path, SHARED_DATA=str(ROOT.parent / "shared" / "data"),
                MPLBACKEND="Agg")


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    """(environment, python command, server pid or None) for the blocks: through the warm server, or cold."""
    if os.environ.get("RANKWISE_DOCS_COLD"):
        yield _env([]), [sys.executable], None
        return
    sys.path.insert(0, str(WARM.parent))
    import warm_exec

    root = tmp_path_factory.mktemp("warm")
    sock = str(root / "s")
    if len(sock) > 100:  # AF_UNIX paths are limited to about 107 bytes
        sock = os.path.join(tempfile.mkdtemp(prefix="rw-docs-", dir="/tmp"), "s")
    python = warm_exec.write_shims(str(root / "bin"), sock)["python"]
    env = _env([str(root / "bin")])
    server = subprocess.Popen([sys.executable, str(WARM), "serve", sock], env=_env([]), stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not os.path.exists(sock):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"warm server did not start: {server.stderr.read().decode()[-2000:]}")
            time.sleep(0.1)
        yield env, python, server.pid
    finally:
        server.kill()
        server.wait()


@pytest.mark.parametrize("doc", [d for d in DOCS if d.exists() and blocks(d)], ids=lambda d: d.name)
def test_doc_examples_run(doc, tmp_path, minilm, runner):
    env, python, _ = runner
    for i, (lang, code) in enumerate(blocks(doc)):
        if lang == "python":
            script = tmp_path / f"block{i}.py"
            script.write_text(code)
            cmd = [*python, str(script)]
        else:
            cmd = ["bash", "-euo", "pipefail", "-c", code]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{doc.name} block {i} ({lang}) failed:\n{code}\n--- stderr ---\n{proc.stderr[-3000:]}"


def test_warm_runs_behave_like_fresh_processes(runner, tmp_path):
    """What the doc checks rely on: exit status, stdout, stderr, stdin, cwd, environment and argv reach the warm
    child as they would a fresh process, and a failure or an uncaught exception is its own (the server lives on)."""
    env, python, server = runner
    if server is None:
        pytest.skip("RANKWISE_DOCS_COLD=1: no warm server to check")
    script = tmp_path / "s.py"
    script.write_text("import os, sys\nprint(sys.argv[1:], os.getcwd(), os.environ['MARK'], sys.stdin.read())\n"
                      "print(os.getppid(), 'to stderr', file=sys.stderr)\nsys.exit(int(sys.argv[1]))\n")
    env = dict(env, MARK="m1")
    proc = subprocess.run([*python, str(script), "3"], cwd=tmp_path, env=env, input="in", capture_output=True,
                          text=True, timeout=120)
    # the parent is the server: the script really ran warm, not through the cold fallback
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, f"['3'] {tmp_path} m1 in\n", f"{server} to stderr\n")
    script.write_text("raise ValueError('boom')\n")
    proc = subprocess.run([*python, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().endswith("ValueError: boom")
    cli = subprocess.run(["bash", "-c", "rankwise strategies --format json | head -c 1; rankwise plan"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert cli.stdout == "[" and cli.returncode == 2
    assert cli.stderr == "rankwise plan: error: give exactly one of --budget (e.g. 300k, 1.2M, 0.5%) or --budget-rank R\n"

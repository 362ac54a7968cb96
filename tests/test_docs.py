"""Every ```bash and ```python block in README.md and docs/*.md runs, in order, in one temp folder per file.

Blocks fenced as ```sh or ``` (no language), or preceded by `<!-- skip-test -->`, are shown but not run
(`make demo` itself, multi-minute trainings on real data). Each run is checked by its exit status and by the
asserts the examples contain.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK_RE = re.compile(r"(<!-- skip-test -->\s*\n)?```(bash|python)\n(.*?)```", re.S)


def blocks(path: Path) -> list[tuple[str, str]]:
    return [(m.group(2), m.group(3)) for m in BLOCK_RE.finditer(path.read_text()) if not m.group(1)]


@pytest.mark.parametrize("doc", [d for d in DOCS if d.exists() and blocks(d)], ids=lambda d: d.name)
def test_doc_examples_run(doc, tmp_path, minilm):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               SHARED_DATA=str(ROOT.parent / "shared" / "data"), MPLBACKEND="Agg")
    for i, (lang, code) in enumerate(blocks(doc)):
        if lang == "python":
            script = tmp_path / f"block{i}.py"
            script.write_text(code)
            cmd = [sys.executable, str(script)]
        else:
            cmd = ["bash", "-euo", "pipefail", "-c", code]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{doc.name} block {i} ({lang}) failed:\n{code}\n--- stderr ---\n{proc.stderr[-3000:]}"

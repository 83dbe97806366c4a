"""The code blocks of the documentation, and a runner for a page's python blocks
(imported by file path by test_docs.py, and run as a script by it).

A fenced block is ```` ```LANG ```` ... ```` ``` ```` (indented fences inside
lists too). The line before the fence may hold a marker:

- ``<!-- no-run -->``: a python block that cannot run here (a GPU, torchrun,
  real weights); it is still compiled, so its syntax is checked;
- ``<!-- fragment -->``: a toml block that is part of a config, not a whole one.

As a script: ``python helpers_docs.py PAGES.json RESULTS.json WORKDIR`` runs
each page's python blocks in order in one namespace, each page in its own
forked process whose working directory is a fresh folder under WORKDIR
(holding a copy of examples/, which pages name as from a checkout; torch
and kdcore are imported once, before the forks, so a page costs only its own
code), and writes ``{page: {"ok": bool, "error": str, "seconds": float}}``.
"""

from __future__ import annotations

import re
import sys
from typing import NamedTuple
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NO_RUN = "<!-- no-run -->"
FRAGMENT = "<!-- fragment -->"
PAGE_SECONDS = 120  # the most one page's blocks may take
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,}|~{3,})[ \t]*(?P<lang>[\w+-]*)[^\n]*$")


class Block(NamedTuple):
    page: str          # path relative to the repository root
    line: int          # 1-based line of the first line of code
    lang: str
    code: str
    marker: str        # the comment on the line before the fence, or ""


def pages() -> list[Path]:
    """Every documentation page: docs/**/*.md, README.md and the plugins' READMEs."""
    found = sorted(p for p in (ROOT / "docs").rglob("*.md") if "_hooks" not in p.parts)
    return found + [ROOT / "README.md"] + sorted(ROOT.glob("plugins/*/README.md"))


def _closes(line: str, ticks: str) -> bool:
    s = line.strip()
    return len(s) >= len(ticks) and set(s) == {ticks[0]}


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of one markdown file, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    page = path.relative_to(ROOT).as_posix()
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, ticks = m["indent"], m["ticks"]
        prev = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        body, j = [], i + 1
        while j < len(lines) and not _closes(lines[j], ticks):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        marker = prev if prev in (NO_RUN, FRAGMENT) else ""
        out.append(Block(page, i + 2, m["lang"].lower(), "\n".join(body) + "\n", marker))
        i = j + 1
    return out


def source_of(block: Block) -> str:
    """The block's code padded with blank lines, so tracebacks name its line in the page."""
    return "\n" * (block.line - 1) + block.code


def _run_page(page: str, sources: list[str], workdir: Path) -> None:
    """In a forked child: run one page's blocks in order in one namespace; exit 0 or 1."""
    import os
    import shutil
    import signal
    import traceback

    signal.alarm(PAGE_SECONDS)  # a page that hangs is ended (SIGALRM) and reported, not waited for
    shutil.copytree(ROOT / "examples", workdir / "examples")  # pages name examples/... as from a checkout
    os.chdir(workdir)
    sys.path.insert(0, str(workdir))  # modules a page writes (a plugin, a model) import from here
    namespace = {"__name__": "__main__"}
    try:
        for src in sources:
            exec(compile(src, str(ROOT / page), "exec"), namespace)
    except BaseException as exc:  # noqa: BLE001 (everything a page raises is its failure)
        tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None  # from the page's frame
        (workdir / "_error.txt").write_text("".join(traceback.format_exception(type(exc), exc, tb)))
        os._exit(1)
    os._exit(0)


def main(argv: list[str]) -> int:
    import json
    import os
    import time

    import torch  # noqa: F401  (imported once, before the forks)

    import kdcore

    kdcore.available("loss")  # the plugins, loaded once too
    for heavy in ("transformers", "torchvision"):  # imported by several pages: once, if installed
        try:
            __import__(heavy)
        except ImportError:
            pass
    spec, results_path, root = json.loads(Path(argv[0]).read_text()), Path(argv[1]), Path(argv[2])
    results = {}
    for n, (page, sources) in enumerate(spec.items()):
        workdir = root / f"page{n}"
        workdir.mkdir(parents=True)
        start = time.perf_counter()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _run_page(page, sources, workdir)
        _, status = os.waitpid(pid, 0)
        ok = os.waitstatus_to_exitcode(status) == 0
        error = "" if ok else ((workdir / "_error.txt").read_text() if (workdir / "_error.txt").exists()
                               else f"exit status {os.waitstatus_to_exitcode(status)}"
                               + (f" (over {PAGE_SECONDS} s)" if os.waitstatus_to_exitcode(status) == -14 else ""))
        results[page] = {"ok": ok, "error": error, "seconds": round(time.perf_counter() - start, 2)}
    results_path.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

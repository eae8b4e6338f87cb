"""``btlm serve`` as a command: the quickstart of docs/serve.md as written, and its one-line errors."""

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from btlm import cli

DOC = Path(__file__).resolve().parents[2] / "docs" / "serve.md"


def quickstart():
    """(shell commands, python code) of the quickstart block in docs/serve.md."""
    block = DOC.read_text().split("<!-- quickstart")[1].split("<!-- /quickstart -->")[0]
    bash = re.search(r"```bash\n(.*?)```", block, re.S).group(1)
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    commands = [line.split("#")[0].split() for line in bash.strip().splitlines()]
    return commands, code


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_quickstart_runs_as_written(tmp_path):
    commands, code = quickstart()
    assert [c[:2] for c in commands] == [["btlm", "init"], ["btlm", "serve"]]
    assert code.count("\n") <= 6  # the promised short client snippet
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    btlm = [sys.executable, "-m", "btlm"]
    init_args = commands[0][1:]
    out = init_args.index("--out") + 1
    init_args[out] = str(tmp_path / init_args[out])
    assert cli.main(init_args) == 0  # the same command, in-process (one interpreter start less)
    serve_args = [a if a != "8000" else str(port) for a in commands[1][1:]]
    server = subprocess.Popen(btlm + serve_args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "btlm serve did not come up"
            time.sleep(0.2)
        run = subprocess.run([sys.executable, "-c", code.replace("8000", str(port))], capture_output=True, text=True,
                             timeout=60)
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip()  # 20 tokens of text
    finally:
        server.send_signal(signal.SIGINT)
        try:
            out, _ = server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            out, _ = server.communicate()
    assert server.returncode == 0, out


def test_serve_errors_are_one_line(tmp_path, capsys, monkeypatch):
    assert cli.main(["serve", "--model", str(tmp_path / "missing")]) == 1
    assert capsys.readouterr().err.strip() == f"error: model directory {tmp_path / 'missing'} does not exist"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert cli.main(["serve", "--model", str(gguf), "--engine", "torch"]) == 1
    assert "serve it with --engine llama.cpp" in capsys.readouterr().err
    if importlib.util.find_spec("llama_cpp") is None:
        assert cli.main(["serve", "--model", str(gguf)]) == 1
        assert capsys.readouterr().err.strip() == (
            "error: the llama.cpp engine needs llama-cpp-python: pip install 'btlm[llama]'")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else find_spec(name, *a))
    assert cli.main(["serve", "--model", str(tmp_path)]) == 1  # checked before any model is loaded
    assert capsys.readouterr().err.strip() == "error: btlm serve needs 'fastapi': pip install 'btlm[serve]'"
    monkeypatch.undo()
    assert cli.main(["serve", "--help"]) == 0
    assert "--max-batch-size" in capsys.readouterr().out

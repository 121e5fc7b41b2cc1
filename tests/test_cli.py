"""The `moestream` command as a user runs it: a real process, its output and exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import expert_bytes

COMMANDS = ["convert", "run", "demo", "inspect"]


def cli(*args, env=None, timeout=600):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "moestream.cli", *map(str, args)], capture_output=True, text=True,
                          env=e, timeout=timeout)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(command):
    r = cli(*([command] if command else []), "--help")
    assert r.returncode == 0, r.stderr
    assert "usage: moestream" in r.stdout
    if command:
        assert command in r.stdout


def test_console_script_installed():
    import shutil

    exe = shutil.which("moestream") or os.path.join(os.path.dirname(sys.executable), "moestream")
    r = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("moestream ")


def test_run_store_prints_text_and_stats(qwen3_store, tmp_path):
    stats = tmp_path / "stats.json"
    r = cli("run", qwen3_store, "-p", "import os", "--raw", "-n", 12, "--cache", expert_bytes(qwen3_store) // 4,
            "--stats-json", stats, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("import os")
    for label in ("time to first token", "decode", "hit rate", "GB", "MB/s", "I/O wait", "peak RSS"):
        assert label in r.stderr
    d = json.loads(stats.read_text())
    assert d["generated_tokens"] == 12 and d["prompt_tokens"] > 0
    assert d["decode"]["misses"] > 0 and d["decode"]["evictions"] > 0


def test_run_checkpoint_converts_once_into_cache(qwen3_ckpt, tmp_path):
    env = {"MOESTREAM_HOME": str(tmp_path / "home")}
    r = cli("run", qwen3_ckpt, "-p", "hello", "-n", 4, "--cache", "100KB", env=env)
    assert r.returncode == 0, r.stderr
    assert "converting" in r.stderr
    stores = list((tmp_path / "home" / "stores").iterdir())
    assert len(stores) == 1 and (stores[0] / "store.json").is_file()
    r = cli("run", qwen3_ckpt, "-p", "hello", "-n", 4, "--cache", "100KB", env=env)
    assert r.returncode == 0 and "converting" not in r.stderr


def test_run_memory_too_small_is_a_clear_error(qwen3_store):
    r = cli("run", qwen3_store, "-p", "x", "--memory", "50MB")
    assert r.returncode == 2
    assert "moestream: error:" in r.stderr and "dense weights need" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_inputs_are_clear_errors(tmp_path, qwen3_store):
    r = cli("run", tmp_path / "missing", "-p", "x")
    assert r.returncode == 2 and "no such directory" in r.stderr and "Traceback" not in r.stderr
    r = cli("run", qwen3_store, "-p", "x", "--memory", "lots")
    assert r.returncode == 2 and "--memory" in r.stderr
    r = cli("run", qwen3_store, "-p", "x", "--cache", "1MB", "--top-p", "0")
    assert r.returncode == 2 and "--top-p" in r.stderr


def test_convert_and_inspect(qwen3_ckpt, tmp_path):
    out = tmp_path / "s"
    r = cli("convert", qwen3_ckpt, out)
    assert r.returncode == 0, r.stderr
    r = cli("convert", qwen3_ckpt, out)
    assert r.returncode == 2 and "--force" in r.stderr
    r = cli("inspect", out)
    assert r.returncode == 0 and "qwen3_moe" in r.stdout and "gate_up_proj" in r.stdout
    r = cli("inspect", out, "--json")
    assert json.loads(r.stdout)["moe_layers"] == 2
    r = cli("inspect", qwen3_ckpt, "--json")  # a checkpoint: sizes from its config, no conversion
    d = json.loads(r.stdout)
    assert (d["moe_layers"], d["experts"], d["top_k"], d["supported"]) == (2, 8, 2, True)
    r = cli("inspect", "deepseek-v3")
    assert r.returncode == 0 and "supported     yes: experts streamed as stored (fp8)" in r.stdout


def test_random_demo_streams_on_a_fresh_home(tmp_path):
    """`demo --random`: builds the 1.2 GB random checkpoint, converts it, streams with a 256 MB expert cache."""
    stats = tmp_path / "demo.json"
    r = cli("demo", "--random", "-n", 16, "--stats-json", stats, "--device", "cpu",
            env={"MOESTREAM_HOME": str(tmp_path / "home")}, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(stats.read_text())
    assert d["cache_budget"] == 256 * 10**6
    assert d["decode"]["misses"] > 0 and d["decode"]["evictions"] > 0
    assert d["generated_tokens"] == 16
    meta = json.loads((tmp_path / "home" / "demo" / "store" / "store.json").read_text())
    experts = sum(i["experts"] * i["record_bytes"] for i in meta["layers"])
    assert experts > 4 * d["cache_budget"]  # experts several times the budget: they must stream

"""Server processes for bench_goodput.py: start one in its own session, wait for /health, read its
counters, stop it (SIGTERM, then SIGKILL to its process group), and wait for the GPUs to empty.
Also the checkpoint (Llama-3-8B shape, random weights at load time) and machine facts from
nvidia-smi (the driver never initialises CUDA itself: the GPUs belong to the servers).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------- machine, checkpoint
def gpus() -> list[str]:
    """GPU names from nvidia-smi, else from the driver's /proc entries; [] on a machine without."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout
        names = [line.strip() for line in out.splitlines() if line.strip()]
        if names:
            return names
    except (OSError, subprocess.SubprocessError):
        pass
    names = []
    base = "/proc/driver/nvidia/gpus"
    for d in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        try:
            with open(os.path.join(base, d, "information")) as f:
                names += [line.split(":", 1)[1].strip() for line in f if line.startswith("Model:")]
        except OSError:
            continue
    return names


def gpu_memory_used_mib() -> list[int]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
        return [int(x) for x in out.split()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return []


def make_checkpoint(path: str, shape: str) -> None:
    from router.fake_engine import write_word_tokenizer
    from serve_smoke import LLAMA3_8B
    cfg = dict(LLAMA3_8B)
    if shape == "tiny":
        cfg.update(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, torch_dtype="float32", max_position_embeddings=512)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    write_word_tokenizer(path, vocab=cfg["vocab_size"])


# ---------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children first), from /proc; [] where there is no /proc."""
    children: dict[int, list[int]] = {}
    try:
        entries = [d for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return []
    for d in entries:
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, stack = [], [pid]
    while stack:
        for c in children.get(stack.pop(), []):
            out.append(c)
            stack.append(c)
    return out


def _alive(pid: int) -> bool:
    """Running (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


class ServerProc:
    """One server subprocess, output to a log file. It stays in our process group, so a time limit that
    signals the group (GNU timeout does) reaches it too; stop() sends SIGTERM (the server shuts its Ray
    down), then SIGKILLs whatever of its process tree is left."""

    def __init__(self, mode: str, cmd: list[str], env: dict, log_path: str, port: int):
        self.mode, self.cmd, self.env, self.log_path, self.port = mode, cmd, env, log_path, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout_s: float) -> None:
        t0 = time.perf_counter()
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while True:
            try:
                with opener.open(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.mode} server exited (rc={self.proc.returncode}):\n{self.tail()}")
            if time.perf_counter() - t0 > timeout_s:
                raise RuntimeError(f"{self.mode} server not healthy after {timeout_s:.0f}s:\n{self.tail()}")
            time.sleep(1.0)

    def metrics(self) -> dict[str, float]:
        """Sums of the disagg:* counters we track (local prefills, KV transfer plans), {} if unavailable."""
        out: dict[str, float] = {}
        try:
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(self.url + "/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return out
        for line in text.splitlines():
            for key in ("disagg:local_prefills_total", "disagg:kv_transfer_plans_total"):
                if line.startswith(key):
                    try:
                        out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
                    except ValueError:
                        pass
        return out

    def tail(self, n: int = 3000) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 60.0) -> None:
        if self.proc is None:
            return
        tree = descendants(self.proc.pid)         # before it exits: orphans would be reparented
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()
        t0 = time.perf_counter()
        while any(_alive(p) for p in tree) and time.perf_counter() - t0 < 5.0:
            time.sleep(0.2)
        for p in tree:                            # what the server did not take down with it
            if _alive(p):
                try:
                    os.kill(p, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        self.log.close()


def wait_gpus_free(timeout_s: float = 30.0, below_mib: int = 2048) -> None:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        used = gpu_memory_used_mib()
        if not used or max(used) < below_mib:
            return
        time.sleep(1.0)
    print(f"warning: GPU memory still in use after {timeout_s:.0f}s: {gpu_memory_used_mib()} MiB", file=sys.stderr)


def get_json(url: str) -> dict:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as r:
        return json.loads(r.read())

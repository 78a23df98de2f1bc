"""Load test of `sharnn serve`: N concurrent clients for a fixed time against a server on 127.0.0.1.

    python benchmarks/serve_load.py runs/tiny --clients 1 8 32 --seconds 30 --length 200

Starts `sharnn serve CKPT` on a free port of 127.0.0.1 (or uses `--url` of a running server), then for each N
runs N client threads that each send POST /v1/generate requests back to back (a fixed prompt, `--length` bytes,
a seed of their own per request) until the time is up. Reports requests/s, generated chars/s, p50/p99 request
latency, errors (anything but a 200 with the asked-for length), and the server's peak resident memory (VmHWM,
when it started the server). Then it asks again, one at a time with nothing else running, for a sample of the
requests made under load and counts how many got the identical text: a request's bytes must not depend on what
else was being generated beside it. Stops the server with SIGTERM and reports its exit status (0 expected).
Only loopback addresses are ever contacted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PROMPTS = ["def main(", "import os\n", "class Tree:\n    def ", "# A comment about ", "for i in range(",
           "return self.", "if __name__ == ", "with open("]


@dataclass
class Run:
    clients: int
    seconds: float
    requests: int = 0
    chars: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    answers: dict[tuple[str, int], str] = field(default_factory=dict)  # (prompt, seed) -> text

    def row(self) -> dict[str, float | int]:
        lat = sorted(self.latencies) or [float("nan")]
        pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
        return {"clients": self.clients, "requests": self.requests, "req_per_s": self.requests / self.seconds,
                "chars_per_s": self.chars / self.seconds, "p50_s": pick(0.5), "p99_s": pick(0.99),
                "errors": self.errors}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_only(url: str) -> str:
    host = httpx.URL(url).host
    if host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("127."):
        raise SystemExit(f"serve_load: {url} is not a loopback address; this load test only runs against this machine")
    return url.rstrip("/")


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout: float = 120.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"serve_load: the server exited with status {proc.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit("serve_load: the server did not answer /healthz in time")


def generate(client: httpx.Client, url: str, prompt: str, seed: int, length: int) -> str:
    r = client.post(f"{url}/v1/generate", json={"prompt": prompt, "length": length, "seed": seed},
                    timeout=300)
    r.raise_for_status()
    body = r.json()
    if body["tokens"] != length:
        raise RuntimeError(f"asked for {length} tokens, got {body['tokens']}")
    return body["text"]


def run_clients(url: str, clients: int, seconds: float, length: int, first_seed: int = 0) -> Run:
    """`clients` threads sending requests back to back for `seconds`; every answer is kept by (prompt, seed)."""
    run = Run(clients, seconds)
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(k: int) -> None:
        prompt = PROMPTS[k % len(PROMPTS)]
        with httpx.Client() as c:
            start.wait()
            i = 0
            while time.perf_counter() < stop_at[0]:
                seed = first_seed + k * 1_000_000 + i
                i += 1
                t0 = time.perf_counter()
                try:
                    text = generate(c, url, prompt, seed, length)
                except (httpx.HTTPError, RuntimeError, KeyError, ValueError):
                    with lock:
                        run.errors += 1
                    continue
                with lock:
                    run.latencies.append(time.perf_counter() - t0)
                    run.requests += 1
                    run.chars += len(text.encode("utf-8", errors="surrogatepass"))
                    run.answers[(prompt, seed)] = text

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + seconds
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    run.seconds = max(seconds, time.perf_counter() - t0)  # requests running at the deadline finish and count
    return run


def recheck_alone(url: str, run: Run, sample: int, length: int, rng: random.Random) -> tuple[int, int]:
    """Ask again for `sample` of the answers, one request at a time: how many are identical."""
    keys = rng.sample(sorted(run.answers), min(sample, len(run.answers)))
    with httpx.Client() as c:
        same = sum(generate(c, url, prompt, seed, length) == run.answers[(prompt, seed)] for prompt, seed in keys)
    return same, len(keys)


def peak_memory_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?", help="checkpoint or run folder to serve (or give --url)")
    p.add_argument("--url", help="a running server on this machine instead, e.g. http://127.0.0.1:8000")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=30.0, help="per client count (default: 30)")
    p.add_argument("--length", type=int, default=200, help="bytes per request (default: 200)")
    p.add_argument("--slots", type=int, default=8, help="the server's --slots (default: 8)")
    p.add_argument("--queue", type=int, default=64, help="the server's --queue (default: 64)")
    p.add_argument("--recheck", type=int, default=16, help="answers per client count asked again alone (default: 16)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    if bool(args.checkpoint) == bool(args.url):
        p.error("give a checkpoint to serve, or --url of a running server")
    proc = None
    if args.url:
        url = loopback_only(args.url)
    else:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "sharnn.cli", "serve", args.checkpoint, "--host", "127.0.0.1", "--port",
               str(port), "--slots", str(args.slots), "--queue", str(args.queue)]
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    rng = random.Random(0)
    rows, rechecks = [], []
    try:
        wait_healthy(url, proc)
        model = httpx.get(f"{url}/v1/model", timeout=10).json()
        for n in args.clients:
            run = run_clients(url, n, args.seconds, args.length, first_seed=1000 * n)
            rows.append(run.row())
            rechecks.append(recheck_alone(url, run, args.recheck, args.length, rng))
    finally:
        peak = peak_memory_mib(proc.pid) if proc is not None else None
        status = None
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                status = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                status = proc.wait()
    out = {"cpu": cpu_name(), "cores": os.cpu_count(), "checkpoint": model["checkpoint"],
           "parameters": model["parameters"], "slots": model["step_rows"], "length": args.length,
           "seconds": args.seconds, "peak_memory_mib": peak, "server_exit_status": status,
           "rows": [{**r, "identical_alone": f"{s}/{k}"} for r, (s, k) in zip(rows, rechecks)]}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{out['cpu']}, {out['cores']} cores; {out['checkpoint']} ({out['parameters']:,} parameters), "
          f"{out['slots']} slots; {args.length}-byte requests, {args.seconds:g} s per row")
    print("| clients | requests/s | chars/s | p50 latency | p99 latency | errors | identical to alone |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in out["rows"]:
        print(f"| {r['clients']} | {r['req_per_s']:.2f} | {r['chars_per_s']:,.0f} | {r['p50_s']:.3f} s | "
              f"{r['p99_s']:.3f} s | {r['errors']} | {r['identical_alone']} |")
    if peak is not None:
        print(f"server peak memory (VmHWM): {peak:,.0f} MiB; exit status after SIGTERM: {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

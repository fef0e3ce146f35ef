"""`minillama bench serve`: `minillama serve` against llama-cpp-python's OpenAI server on the same GGUF file.

Both servers run as their users start them, each its own process on loopback, 2 threads for llama.cpp:
  minillama     `minillama serve FILE` (continuous batching over the paged KV cache)
  llama.cpp     `python -m llama_cpp.server --model FILE --n_threads 2 --interrupt_requests False` (one
                request at a time; without the flag a new request would cut the running one short)
For 1, 8 and 32 concurrent clients, each client streams its chat requests one after another (greedy,
max_tokens fixed, prompts that ask for long answers). Measured per request: time to the first text, and
to the end; tokens = the answer re-encoded with the model's tokenizer (one count for both servers). Reported:
aggregate tokens/s (all tokens / wall time), median time to first token, p50/p95 latency, and the ratios.
The machine is shared: the contenders alternate at each client count, and the load average is printed.
"""

import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from pathlib import Path

from minillama.config import UserError

TOPICS = ["a dragon who bakes bread", "the first city on Mars", "a lighthouse keeper", "a robot learning to paint",
          "two rival chess players", "a river that flows uphill", "a library that never closes",
          "an island of clocks"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(contender: str, path: Path, port: int) -> subprocess.Popen:
    if contender == "minillama":
        cmd = [sys.executable, "-m", "minillama", "serve", str(path), "--port", str(port)]
    else:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--port", str(port),
               "--host", "127.0.0.1", "--n_threads", "2", "--n_ctx", "2048", "--verbose", "False",
               "--interrupt_requests", "False"]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    tail = deque(maxlen=20)  # the server's last stderr lines, read as they come: a full pipe would stall it
    threading.Thread(target=tail.extend, args=(process.stderr,), daemon=True).start()
    deadline = time.time() + 600
    while time.time() < deadline:
        if process.poll() is not None:
            time.sleep(0.5)  # the reader catches up
            raise UserError(f"{contender} server exited: {''.join(tail)[-500:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
                if r.status == 200 and _ready(port, contender):
                    return process
        except OSError:
            pass
        time.sleep(0.5)
    process.kill()
    raise UserError(f"{contender} server did not start within 10 minutes")


def _ready(port: int, contender: str) -> bool:
    if contender != "minillama":
        return True
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status == 200
    except OSError:
        return False


def model_id(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as r:
        return json.load(r)["data"][0]["id"]


def stream_chat(port: int, model: str, topic: str, max_tokens: int) -> tuple[float, float, str]:
    """One streamed chat request: (seconds to the first text, seconds to the end, the answer)."""
    body = {"model": model, "messages": [{"role": "user", "content": f"Write a long story about {topic}."}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    start, first, text = time.perf_counter(), None, ""
    with urllib.request.urlopen(request, timeout=1200) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            piece = (choices[0].get("delta") or {}).get("content") or ""
            if piece and first is None:
                first = time.perf_counter() - start
            text += piece
    return first or 0.0, time.perf_counter() - start, text


def run_clients(port: int, clients: int, requests_each: int, max_tokens: int, count) -> dict:
    """`clients` threads, each streaming `requests_each` requests in turn; the figures of the whole run."""
    results, errors, model = [], [], model_id(port)

    def client(c):
        for i in range(requests_each):
            try:
                results.append(stream_chat(port, model, TOPICS[(c + i) % len(TOPICS)], max_tokens))
            except OSError as e:
                errors.append(str(e))

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
    latencies = sorted(r[1] for r in results)
    tokens = sum(count(r[2]) for r in results)
    return {"requests": len(results), "tokens": tokens, "tok_s": tokens / wall,
            "ttft": statistics.median(r[0] for r in results), "p50": statistics.median(latencies),
            "p95": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]}


def serve_bench(args) -> None:
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError:
        raise UserError("this benchmark runs llama-cpp-python's server: pip install -e '.[bench]'") from None
    from minillama.checkpoint.load import resolve_model_path
    from minillama.tokenizer import load_tokenizer

    path = resolve_model_path(args.path)
    tokenizer = load_tokenizer(path)
    count = lambda text: len(tokenizer.encode(text, bos=False))  # noqa: E731
    table = []
    for clients in args.clients:
        for contender in ("minillama", "llama.cpp"):
            port = free_port()
            process = start(contender, path, port)
            try:
                run_clients(port, 1, 1, 8, count)  # warm-up: first-call costs are not serving speed
                row = run_clients(port, clients, max(1, args.requests // clients), args.max_tokens, count)
            finally:
                process.terminate()
                process.wait(30)
            table.append({"contender": contender, "clients": clients, **row})
            print(json.dumps(table[-1]), file=sys.stderr, flush=True)
    print(format_table(table))


def format_table(table: list[dict]) -> str:
    lines = ["| clients | contender | requests | tokens | aggregate tok/s | TTFT p50 s | latency p50 s | "
             "latency p95 s | tok/s ratio |", "|---|---|---|---|---|---|---|---|---|"]
    reference = {r["clients"]: r["tok_s"] for r in table if r["contender"] == "llama.cpp"}
    for r in table:
        ratio = r["tok_s"] / reference[r["clients"]] if reference.get(r["clients"]) else float("nan")
        lines.append(f"| {r['clients']} | {r['contender']} | {r['requests']} | {r['tokens']} | {r['tok_s']:.1f} | "
                     f"{r['ttft']:.2f} | {r['p50']:.2f} | {r['p95']:.2f} | {ratio:.2f}x |")
    lines.append(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other processes share them)")
    return "\n".join(lines)


def serve_bench_flags(p) -> None:
    p.add_argument("path", nargs="?", default="smollm2", help="GGUF file both servers load (default smollm2)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients (default 1 8 32)")
    p.add_argument("--requests", type=int, default=32,
                   help="requests per client count, split between the clients (default 32)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per answer (default 64)")

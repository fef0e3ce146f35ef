"""`minillama bench generate`: minillama as a user runs it, against llama.cpp and transformers, in one run.

Every contender is its own process on the same GGUF file, measured the way its user sees it:
  minillama     `minillama generate FILE --prompt-ids ... --temperature 0 --ignore-eos` with its defaults;
                decode and prefill tok/s from its own timing line, which excludes loading
  llama.cpp     llama-cpp-python, 2 threads (peers.py: the same greedy batches through llama_decode)
  transformers  LlamaForCausalLM.generate on the same file, fp32 (peers.py)
Rows: SmolLM2-135M-Instruct Q4_1 (the shipped file), the same in Q8_0 (llama.cpp's own quantizer), and
a stories110M-shaped model with random weights in f32 and bf16. Measured: decode tok/s at batch 1 and
(aggregated) at batch 8, prefill tok/s of a 512-token prompt, time from process start to the first
token minus a bare `import` of the same program, and peak memory beyond that import. `% bw` = the
weight bytes a decode step reads × steps/s / the memory bandwidth measured in this run. The machine is
shared: contenders alternate within each round, medians over rounds are shown, with the load average.
"""

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from minillama.bench.common import CpuMeter
from minillama.config import UserError

ROWS = ("smollm2-q4_1", "smollm2-q8_0", "stories110m-f32", "stories110m-bf16")
CONTENDERS = ("minillama", "llama.cpp", "transformers")
TRANSFORMERS_ROWS = ("smollm2-q4_1", "stories110m-f32")  # it dequantizes everything to fp32 anyway


# ---- the files ----

def bench_file(row: str) -> Path:
    """The GGUF file of a row, made once into the cache."""
    from minillama.data.assets import cache_dir, smollm2_gguf

    path = smollm2_gguf() if row == "smollm2-q4_1" else cache_dir() / "bench" / f"{row}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        print(f"writing {path} (once) ...", file=sys.stderr)
        if row == "smollm2-q8_0":
            import llama_cpp

            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.allow_requantize = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, True
            if llama_cpp.llama_model_quantize(str(smollm2_gguf()).encode(), str(tmp).encode(), params) != 0:
                raise UserError("llama.cpp could not quantize SmolLM2 to Q8_0")
        else:
            write_stories_gguf(tmp, torch.bfloat16 if row.endswith("bf16") else torch.float32)
        os.replace(tmp, path)
    from minillama.checkpoint.gguf import prepared

    prepared(path)  # the loader's one-time index of the file, made now: not part of a timed first token
    return path


def write_stories_gguf(path: Path, dtype) -> None:
    """stories110M's shape with random weights and Llama 2's 32k SentencePiece vocabulary, as GGUF."""
    from minillama.checkpoint.gguf_export import export_gguf
    from minillama.config import preset
    from minillama.data.assets import llama_cpp_vocab_dir
    from minillama.model import Llama
    from minillama.tokenizer import load_tokenizer

    model = Llama(preset("stories110M").replace(max_seq_len=1024)).init_weights(0)
    tokenizer = load_tokenizer(llama_cpp_vocab_dir() / "ggml-vocab-llama-spm.gguf")
    export_gguf(model, tokenizer, path, "bf16" if dtype == torch.bfloat16 else "f32", force=True)


def weight_bytes(path: Path) -> int:
    """Bytes a decode step reads: every tensor but the embedding (a lookup reads one row), which a tied
    model reads whole as its LM head."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}
    return sum(tensors.values()) - (tensors["token_embd.weight"] if "output.weight" in tensors else 0)


# ---- one contender, one file: its processes ----

# `python -m minillama ...` that also reports its peak memory on stderr when it exits
MINILLAMA = ("import atexit, sys\nfrom minillama.bench.common import peak_memory_mb\n"
             "atexit.register(lambda: print(f'peak memory {peak_memory_mb():.1f} MB', file=sys.stderr))\n"
             "from minillama.cli import main\nsys.exit(main(sys.argv[1:]))")


def run_minillama(path: Path, job: dict) -> dict:
    base = [sys.executable, "-c", MINILLAMA, "generate", str(path), "--temperature", "0", "--ignore-eos"]
    ids = lambda prompt: ["--prompt-ids", ",".join(map(str, prompt))]  # noqa: E731
    t0 = time.time()
    with tempfile.TemporaryFile() as err:
        process = subprocess.Popen(base + ids(job["b1"]) + ["--max-new-tokens", str(job["new_tokens"]), "--stream"],
                                   stdout=subprocess.PIPE, stderr=err)
        process.stdout.read(1)  # the first streamed piece: the first token exists
        first = time.time() - t0
        process.stdout.read()
        process.wait()
        err.seek(0)
        log = err.read().decode()
    if process.returncode:
        raise RuntimeError(f"minillama generate failed: {log[-500:]}")
    decode_b1 = float(re.search(r"decode \d+ tok \| ([\d.]+) tok/s", log).group(1))
    rows = [json.loads(line) for line in _run(base + sum((ids(p) for p in job["b8"]), []) +
                                                ["--max-new-tokens", str(job["batch_tokens"]), "--json"]).splitlines()]
    prefill = json.loads(_run(base + ids(job["prefill"]) + ["--max-new-tokens", "1", "--json"]))
    return {"decode_b1": decode_b1, "decode_b8": rows[0]["decode_tokens_per_s"],
            "prefill": prefill["prefill_tokens_per_s"], "first_token_s": first,
            "peak_rss_mb": float(re.search(r"peak memory ([\d.]+) MB", log).group(1))}


def _run(cmd: list[str]) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(cmd[:5])} failed: {result.stderr[-500:]}")
    return result.stdout


def run_peer(peer: str, path: Path, job: dict) -> dict:
    cmd = [sys.executable, "-m", "minillama.bench.peers", peer, str(path), "--t0", str(time.time())]
    result = subprocess.run(cmd, input=json.dumps(job), capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{peer} failed: {result.stderr[-800:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def bare_import(contender: str) -> tuple[float, float]:
    """(seconds, peak MB) of a process that only imports the contender: subtracted from its runs. Seconds
    from the start to the end of the imports (a torch process takes ~0.3 s more to exit); the fastest of
    three, as the first import after a while reads the libraries from disk and the runs then don't."""
    module = {"minillama": "torch, minillama", "llama.cpp": "llama_cpp", "transformers": "torch, transformers"}
    code = (f"import time, {module[contender]}; from minillama.bench.common import peak_memory_mb; "
            "print(time.time(), peak_memory_mb())")
    runs = []
    for _ in range(3):
        start = time.time()
        imported, peak = map(float, _run([sys.executable, "-c", code]).split())
        runs.append((imported - start, peak))
    return min(runs)


# ---- the run ----

def measure_bandwidth(megabytes: int = 512) -> float:
    """Bytes/s that torch's threads read with a sum over a buffer far larger than the caches (best of 5)."""
    x = torch.ones(megabytes * 2**20 // 4)
    best = float("inf")
    for _ in range(6):
        with CpuMeter() as meter:
            x.sum()
        best = min(best, meter.seconds)
    return x.numel() * 4 / best


def make_job(vocab: int, new_tokens: int, batch_tokens: int, seed: int) -> dict:
    """Random prompts (ids 3.. of the vocabulary): 16 tokens for decoding, 512 for the prefill."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, min(vocab, 32000), (n,), generator=g).tolist()  # noqa: E731
    return {"b1": ids(16), "b8": [ids(16) for _ in range(8)], "prefill": ids(512), "new_tokens": new_tokens,
            "batch_tokens": batch_tokens}


def run_bench(rows=ROWS, contenders=CONTENDERS, rounds: int = 2, new_tokens: int = 128, batch_tokens: int = 32,
              progress: bool = True) -> list[dict]:
    """One result per (row, contender): medians over rounds; contenders alternate within each round."""
    from tqdm import tqdm

    from minillama.checkpoint.load import load_config

    imports = {c: bare_import(c) for c in contenders}
    results, bandwidths = {}, []
    tasks = [(r, row, c) for r in range(rounds) for row in rows for c in contenders
             if c != "transformers" or row in TRANSFORMERS_ROWS]
    for r, row, c in tqdm(tasks, desc="bench generate", disable=not progress, file=sys.stderr):
        path = bench_file(row)
        if c == contenders[0]:
            bandwidths.append(measure_bandwidth())
        job = make_job(load_config(path).vocab_size, new_tokens, batch_tokens, seed=r)
        got = run_minillama(path, job) if c == "minillama" else run_peer(c, path, job)
        got["first_token_s"] -= imports[c][0]
        got["memory_mb"] = got.pop("peak_rss_mb") - imports[c][1]
        results.setdefault((row, c), []).append(got)
    bandwidth = statistics.median(bandwidths)
    table = []
    for (row, c), runs in results.items():
        median = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
        steps = median["decode_b1"]
        table.append({"row": row, "contender": c, **median, "file_mb": bench_file(row).stat().st_size / 1e6,
                      "bandwidth_share": steps * weight_bytes(bench_file(row)) / bandwidth,
                      "bandwidth_gbs": bandwidth / 1e9, "rounds": len(runs)})
    for entry in table:  # ratios against the peers on the same row
        for peer in ("llama.cpp", "transformers"):
            ref = next((e for e in table if e["row"] == entry["row"] and e["contender"] == peer), None)
            for key in ("decode_b1", "decode_b8", "prefill"):
                entry[f"{key}_vs_{peer}"] = entry[key] / ref[key] if ref else None
    return table


def format_table(table: list[dict]) -> str:
    ratio = lambda r: f"{r:5.2f}x" if r is not None else "     -"  # noqa: E731
    head = (f"{'row':<17} {'contender':<12} | {'decode b1':>9} {'vs lcpp':>7} {'vs hf':>6} {'% bw':>5} | "
            f"{'b8 aggr':>8} {'vs b1':>6} {'vs lcpp':>7} | {'prefill':>8} {'vs lcpp':>7} {'vs hf':>6} | "
            f"{'1st tok':>7} | {'memory':>7} {'file':>6}")
    lines = [head, "-" * len(head)]
    for e in table:
        lines.append(
            f"{e['row']:<17} {e['contender']:<12} | {e['decode_b1']:9.1f} {ratio(e['decode_b1_vs_llama.cpp'])} "
            f"{ratio(e['decode_b1_vs_transformers'])} {100 * e['bandwidth_share']:4.0f}% | {e['decode_b8']:8.1f} "
            f"{ratio(e['decode_b8'] / e['decode_b1'])} {ratio(e['decode_b8_vs_llama.cpp'])} | {e['prefill']:8.1f} "
            f"{ratio(e['prefill_vs_llama.cpp'])} {ratio(e['prefill_vs_transformers'])} | {e['first_token_s']:6.2f}s | "
            f"{e['memory_mb']:5.0f}MB {e['file_mb']:4.0f}MB")
    lines += ["", f"tok/s, medians of {table[0]['rounds']} rounds; ratios against the peer on the same file in this run; "
              f"% bw = weight bytes per decode step x steps/s / {table[0]['bandwidth_gbs']:.1f} GB/s measured now; "
              "1st tok = process start to first token minus a bare import; memory = peak RSS minus a bare import; "
              f"load average {os.getloadavg()[0]:.1f}"]
    return "\n".join(lines)


def generate_bench(args) -> None:
    rows = args.rows.split(",") if args.rows else list(ROWS)
    contenders = args.contenders.split(",") if args.contenders else list(CONTENDERS)
    for name, given, known in (("--rows", rows, ROWS), ("--contenders", contenders, CONTENDERS)):
        if unknown := [x for x in given if x not in known]:
            raise UserError(f"{name}: unknown {unknown[0]!r}; choose from {', '.join(known)}")
    if "llama.cpp" in contenders or "smollm2-q8_0" in rows:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise UserError("llama.cpp is the peer of this benchmark: pip install -e '.[bench]' (it compiles "
                            "llama.cpp, about 5 minutes on 2 cores, once)") from None
    if args.quick:
        args.rounds, args.new_tokens, args.batch_tokens = 1, 16, 8
    table = run_bench(rows, contenders, args.rounds, args.new_tokens, args.batch_tokens)
    print(json.dumps(table, indent=1) if args.json else format_table(table))


def generate_bench_flags(p) -> None:
    p.add_argument("--rows", help=f"comma-separated subset of {','.join(ROWS)} (default: all)")
    p.add_argument("--contenders", help=f"comma-separated subset of {','.join(CONTENDERS)} (default: all)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds; medians are reported (default 2)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens per batch-1 decode (default 128)")
    p.add_argument("--batch-tokens", type=int, default=32, help="tokens per row of the batch-8 decode (default 32)")
    p.add_argument("--quick", action="store_true", help="1 round, 16 and 8 new tokens")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")

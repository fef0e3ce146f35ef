"""The peers of `minillama bench generate`, each run as its own process on the same GGUF file:

  python -m minillama.bench.peers llama.cpp    FILE --t0 T   (llama-cpp-python's low-level API, 2 threads)
  python -m minillama.bench.peers transformers FILE --t0 T   (LlamaForCausalLM.generate, fp32)

Each does what minillama's generator does, greedily: a 512-token prefill (first: the process's first
forward, as each minillama measurement is), batch-1 decode and batch-8 decode (8 sequences in one
batch); and prints one JSON line: tokens/s of each (load excluded: timed from
the first forward), the first token's time since T (the moment the benchmark started the process), and
the process's peak memory. The prompts come as JSON on stdin: {"b1": [ids], "b8": [[ids] x 8],
"prefill": [ids], "new_tokens": N, "batch_tokens": M}.
"""

import argparse
import json
import sys
import time

from minillama.bench.common import peak_memory_mb


def measure(generate, job: dict, t0: float) -> dict:
    """The job's three measurements with a peer's `generate(prompts, new_tokens) -> (prefill seconds,
    decode seconds after the first token, time.time() of the first token)`. The prefill goes first: the
    first forward after loading, as in a user's process (and in minillama's, which runs it alone); the
    first token's time is then the loading plus the batch-1 prompt's own prefill."""
    loaded = time.time()
    prefill, _, _ = generate([job["prefill"]], 1)
    result = {"prefill": len(job["prefill"]) / prefill}
    n = job["new_tokens"]
    prompt, seconds, _ = generate([job["b1"]], n)
    result |= {"decode_b1": (n - 1) / seconds, "first_token_s": loaded - t0 + prompt}
    _, seconds, _ = generate(job["b8"], job["batch_tokens"])
    result["decode_b8"] = 8 * (job["batch_tokens"] - 1) / seconds
    return result


def llama_cpp_run(path: str, job: dict, t0: float) -> dict:
    import ctypes

    import llama_cpp as lc
    import numpy as np

    lc.llama_backend_init()
    model = lc.llama_model_load_from_file(path.encode(), lc.llama_model_default_params())
    params = lc.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_seq_max = 8 * 640, 512, 8  # each sequence gets n_ctx / 8
    params.n_threads = params.n_threads_batch = 2
    ctx = lc.llama_init_from_model(model, params)
    n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    batch = lc.llama_batch_init(512 * 8, 0, 8)

    def decode(rows: list[list[int]], start: int) -> list[int]:
        """One llama_decode of each row's tokens from position `start`; the greedy next token of each row."""
        n = 0
        for seq, ids in enumerate(rows):
            for i, token in enumerate(ids):
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, start + i, 1
                batch.seq_id[n][0], batch.logits[n] = seq, i == len(ids) - 1
                n += 1
        batch.n_tokens = n
        if lc.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        out, last = [], -1
        for ids in rows:
            last += len(ids)
            logits = np.ctypeslib.as_array(ctypes.cast(lc.llama_get_logits_ith(ctx, last),
                                                       ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,))
            out.append(int(logits.argmax()))
        return out

    def generate(prompts: list[list[int]], new_tokens: int) -> tuple[float, float, float]:
        """(prefill seconds, decode seconds, time of the first new token)"""
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        start = time.perf_counter()
        tokens = decode(prompts, 0)
        first, prefill = time.time(), time.perf_counter() - start
        start, position = time.perf_counter(), len(prompts[0])
        for _ in range(new_tokens - 1):
            tokens = decode([[t] for t in tokens], position)
            position += 1
        return prefill, time.perf_counter() - start, first

    return measure(generate, job, t0)


def transformers_run(path: str, job: dict, t0: float) -> dict:
    import torch
    import transformers

    folder, name = path.rsplit("/", 1)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    torch.set_num_threads(2)

    def generate(prompts: list[list[int]], new_tokens: int) -> tuple[float, float, float]:
        stamps = []

        class Stamp(transformers.LogitsProcessor):  # called once per step, right after the forward
            def __call__(self, input_ids, scores):
                stamps.append((time.perf_counter(), time.time()))
                return scores

        ids = torch.tensor(prompts)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, pad_token_id=0,
                           min_new_tokens=new_tokens, do_sample=False,
                           logits_processor=transformers.LogitsProcessorList([Stamp()]))
        return stamps[0][0] - start, stamps[-1][0] - stamps[0][0], stamps[0][1]

    return measure(generate, job, t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("peer", choices=["llama.cpp", "transformers"])
    parser.add_argument("file")
    parser.add_argument("--t0", type=float, required=True, help="time.time() when the process was started")
    args = parser.parse_args()
    run = llama_cpp_run if args.peer == "llama.cpp" else transformers_run
    result = run(args.file, json.loads(sys.stdin.read()), args.t0)
    result["peak_rss_mb"] = peak_memory_mb()
    print(json.dumps(result))


if __name__ == "__main__":
    main()

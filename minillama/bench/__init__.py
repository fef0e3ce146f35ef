"""`minillama bench ...`: speed measured against a reference in the same run (the machines are shared,
so each benchmark alternates contenders, repeats, reports medians and how busy the CPU was)."""

# benchmark: (module, flags function, run function, help)
BENCHMARKS = {
    "train": ("minillama.bench.train", "train_bench_flags", "run_bench",
              "training tokens/s against transformers' LlamaForCausalLM on the same weights"),
    "generate": ("minillama.bench.generate", "generate_bench_flags", "generate_bench",
                 "decode/prefill tok/s against transformers on the same weights"),
    "moe": ("minillama.bench.moe", "moe_bench_flags", "moe_bench",
            "mixture-of-experts forward and decode against transformers' Mixtral on the same weights"),
    "serve": ("minillama.bench.serve", "serve_bench_flags", "serve_bench",
              "streaming clients (1, 8, 32) against llama-cpp-python's OpenAI server on the same GGUF"),
}


def bench_flags(p) -> None:
    import importlib

    sub = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, (module, flags, _, help) in BENCHMARKS.items():
        flags_of = getattr(importlib.import_module(module), flags)
        flags_of(sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ", alternated in one run."))


def bench_command(args) -> None:
    import importlib

    module, _, run, _ = BENCHMARKS[args.benchmark]
    getattr(importlib.import_module(module), run)(args)

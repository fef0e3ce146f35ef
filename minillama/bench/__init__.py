"""`minillama bench ...`: speed measured against a reference in the same run (the machines are shared,
so each benchmark alternates contenders, repeats, reports medians and how busy the CPU was)."""

import importlib

BENCHMARKS = ["train", "generate"]  # each module here defines add_command(subparsers)


def add_commands(sub):
    parser = sub.add_parser("bench", help="speed against transformers, measured in the same run")
    bench_sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name in BENCHMARKS:
        importlib.import_module(f"minillama.bench.{name}").add_command(bench_sub)

"""`minillama lab NAME`: the claims of the notes as experiments a learner runs with one command.

Each experiment is a module here with `run(out: Path, quick: bool) -> dict`: it shows a progress bar,
prints a table, writes NAME.json (its numbers) and NAME.png (its picture) into `out`, and returns the
numbers. `--quick` is a reduced version of about a minute, the one the test suite runs. Results are
what was measured here; where a claim does not reproduce at this scale, the experiment says so.
"""

import importlib
import sys
from pathlib import Path

from minillama.config import UserError

# name: (module under minillama.lab, what it shows); `minillama lab` lists them
EXPERIMENTS: dict[str, tuple[str, str]] = {
    "experts": ("experts", "dense vs mixture of experts at equal active parameters; routing with and without "
                           "the balance loss"),
    "attention": ("attention", "MHA, GQA, MQA and latent attention: KV-cache bytes, decode speed, quality"),
    "temperature": ("temperature", "p^(1/T): the notes' cheese/mouse example exactly, then SmolLM2's next token"),
    "entropy-perplexity": ("entropy_perplexity", "perplexity = 2^(bits/token): n-grams 1-5 vs a small Llama"),
    "tokenizers": ("tokenizers", "BPE vs unigram, English and Chinese: tokens per byte, byte fallback, bits per byte"),
    "norms": ("norms", "pre vs post vs sandwich norm, RMSNorm vs LayerNorm: curves, a no-warmup high lr, timing"),
    "attention-scale": ("attention_scale", "with and without 1/√D: softmax saturation, entropy at init, training"),
    "padding": ("padding", "left vs right padding in batched generation; the causal mask built by broadcasting"),
    "memory": ("memory", "Llama-2-13B's 13,015,864,320 term by term; predicted vs measured training memory"),
    "attention-maps": ("attention_maps", "SmolLM2's heads on 'The animal didn't cross the street because it ...'"),
    "long-context": ("long_context", "RoPE scaling, ReRoPE and ALiBi past the training length: perplexity, passkey"),
}


def lab_flags(p) -> None:
    p.add_argument("name", nargs="?", metavar="NAME", help="the experiment (none: list them)")
    p.add_argument("--quick", action="store_true", help="the reduced version, about a minute")
    p.add_argument("--out", default=None, metavar="DIR", help="where NAME.json and NAME.png go (default runs/lab)")


def lab_command(args) -> None:
    if args.name is None:
        width = max((len(name) for name in EXPERIMENTS), default=0)
        for name, (_, what) in EXPERIMENTS.items():
            print(f"{name:<{width}}  {what}")
        return
    if args.name not in EXPERIMENTS:
        raise UserError(f"unknown experiment {args.name!r}; experiments: {', '.join(EXPERIMENTS)}")
    out = Path(args.out or "runs/lab")
    out.mkdir(parents=True, exist_ok=True)
    experiment = importlib.import_module(f"minillama.lab.{EXPERIMENTS[args.name][0]}")
    experiment.run(out, quick=args.quick)
    print(f"wrote {out / args.name}.json and .png", file=sys.stderr)

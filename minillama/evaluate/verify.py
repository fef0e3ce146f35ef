"""`minillama verify A B`: are two checkpoints the same model? The numbers people need to judge a conversion
or a quantization, on one text: whether the tokenizers agree, the logit difference, the hidden-state
difference after every layer, greedy-token agreement, perplexity of each, and the KL divergence of the
next-token distributions. A and B may be any formats the loader reads; with --llama-cpp, B runs in
llama.cpp (llama-cpp-python), an implementation independent of ours.

Greedy agreement is measured teacher-forced: A generates N tokens greedily from a prompt, B reads prompt +
those tokens in one pass, and we count the steps where B's most likely next token is A's. Up to the first
disagreement this is exactly B generating on its own; `identical` is the length of that common run.

Shapes: T tokens of the text, V vocabulary, C model width, N greedy steps.
"""

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from minillama.config import GenerationConfig, UserError


class MinillamaRunner:
    """A checkpoint run by minillama: logits of every position, and the residual stream after each layer."""

    def __init__(self, name: str, tokenizer_required=True):
        from minillama.checkpoint import load_model_and_tokenizer

        # plain: every weight as float32, the model as stored, not as the fast path rounds it
        self.model, self.tokenizer = load_model_and_tokenizer(name, plain=True, tokenizer_required=tokenizer_required)
        self.vocab_size, self.context = self.model.config.vocab_size, self.model.config.max_seq_len
        self.engine = "minillama, float32"

    def tokenize(self, text: str) -> list[int] | None:
        return None if self.tokenizer is None else self.tokenizer.encode(text)

    @torch.inference_mode()
    def run(self, ids: list[int]):
        """-> logits (T, V) float32, [each layer's output (T, C)]"""
        states = []
        # each layer's output is the residual stream (1, T, C); keep its one row
        hooks = [layer.register_forward_hook(lambda _, __, out: states.append(out[0].float()))
                 for layer in self.model.layers]
        try:
            logits = self.model(torch.tensor([ids], device=self.model.device))[0].float()
        finally:
            for hook in hooks:
                hook.remove()
        return logits.cpu(), [s.cpu() for s in states]

    def greedy(self, prompt: list[int], steps: int) -> list[int]:
        from minillama.infer.generate import generate_ids

        config = GenerationConfig(max_new_tokens=steps, temperature=0.0)  # no stop ids: all N steps
        return [step[0] for step in generate_ids(self.model, [prompt], config)]


class LlamaCppRunner:
    """A .gguf run by llama.cpp through llama-cpp-python: logits of every position (no hidden states)."""

    def __init__(self, path: str, n_ctx: int):
        if not Path(path).is_file() or Path(path).open("rb").read(4) != b"GGUF":
            raise UserError(f"{path}: --llama-cpp runs B in llama.cpp, which reads .gguf files only")
        try:
            import llama_cpp
        except ImportError:
            raise UserError("--llama-cpp needs llama-cpp-python: pip install 'minillama[llamacpp]' "
                            "(it compiles llama.cpp, about 5 minutes)") from None
        # float32 KV cache (llama.cpp's default is f16), so f32 weights can agree to ~1e-6
        f32 = llama_cpp.GGML_TYPE_F32
        self.llm = llama_cpp.Llama(path, logits_all=True, n_ctx=n_ctx, n_threads=torch.get_num_threads(),
                                   type_k=f32, type_v=f32, verbose=False)
        self.vocab_size, self.context = self.llm.n_vocab(), n_ctx
        self.engine = "llama.cpp, f32 KV cache"

    def tokenize(self, text: str) -> list[int]:
        # add_bos=True adds BOS when the vocabulary says to (tokenizer.ggml.add_bos_token), as encode() does
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    def run(self, ids: list[int]):
        import numpy as np

        self.llm.reset()
        self.llm.eval(ids)
        return torch.from_numpy(np.array(self.llm.scores[:len(ids)], dtype=np.float32)), None


def compare(a, b, text: str, max_tokens: int = 256, steps: int = 64, prompt_tokens: int = 32) -> dict:
    """Every number of the report, as a dict (what --json prints)."""
    max_tokens = min(max_tokens, a.context, b.context)
    text = text[:max_tokens * 32]  # enough characters for max_tokens tokens; both tokenize the same cut
    ids_a, ids_b = a.tokenize(text), b.tokenize(text)  # ids_b is None when B has no tokenizer
    mismatch = None if ids_b is None else next((i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y),
                                               None if len(ids_a) == len(ids_b) else min(len(ids_a), len(ids_b)))
    ids = ids_a[:max_tokens]
    if len(ids) < 2:
        raise UserError(f"the text is {len(ids)} token long: give a longer --text")
    if a.vocab_size != b.vocab_size:
        raise UserError(f"A has a vocabulary of {a.vocab_size} and B of {b.vocab_size}: verify compares "
                        "checkpoints of one model")
    (logits_a, states_a), (logits_b, states_b) = a.run(ids), b.run(ids)
    report = {"tokens": len(ids), "tokenizers_agree": None if ids_b is None else mismatch is None,
              "first_token_mismatch": mismatch}
    diff = (logits_a - logits_b).abs()
    report["logits"] = {"max_diff": diff.max().item(), "mean_diff": diff.mean().item(),
                        "top1_agree": (logits_a.argmax(-1) == logits_b.argmax(-1)).float().mean().item()}
    report["layers_max_diff"] = None if states_b is None else [(x - y).abs().max().item()
                                                              for x, y in zip(states_a, states_b)]
    report["perplexity"] = {"a": perplexity(logits_a, ids), "b": perplexity(logits_b, ids)}
    report["perplexity"]["diff"] = report["perplexity"]["b"] - report["perplexity"]["a"]
    kl = kl_divergence(logits_a, logits_b)  # (T,)
    report["kl"] = {"mean": kl.mean().item(), "max": kl.max().item()}
    prompt = ids[:min(prompt_tokens, len(ids) - 1)]
    report["greedy"] = greedy_agreement(a, b, prompt, min(steps, a.context - len(prompt), b.context - len(prompt)))
    return report


def perplexity(logits, ids: list[int]) -> float:
    """exp(mean NLL) of ids[1:] given the logits (T, V) of each position."""
    return math.exp(F.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item())


def kl_divergence(logits_a, logits_b):
    """KL(P_A || P_B) of the next-token distributions, nats per position: (T, V), (T, V) -> (T,)."""
    log_a, log_b = logits_a.double().log_softmax(-1), logits_b.double().log_softmax(-1)
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def greedy_agreement(a, b, prompt: list[int], steps: int) -> dict:
    """A's greedy continuation, and at how many steps B's argmax given the same past is A's token."""
    tokens = a.greedy(prompt, steps)
    logits_b, _ = b.run(prompt + tokens)
    chosen = logits_b[len(prompt) - 1:-1].argmax(-1).tolist()  # (N,) B's pick at each of A's steps
    same = [x == y for x, y in zip(chosen, tokens)]
    return {"steps": len(tokens), "agree": sum(same), "identical": next((i for i, s in enumerate(same) if not s),
                                                                         len(same)),
            "prompt_tokens": len(prompt), "tokens_a": tokens}


# ---- command line ----

def verify_flags(p) -> None:
    from minillama.checkpoint.load import MODEL_HELP

    p.add_argument("a", metavar="A", help=f"the reference: {MODEL_HELP}")
    p.add_argument("b", metavar="B", help="the checkpoint to judge (any format; a .gguf with --llama-cpp)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--text", metavar="FILE", help="a UTF-8 text file (default: the shakespeare corpus)")
    source.add_argument("--corpus", metavar="NAME", default="shakespeare",
                        help="a corpus spec; its validation split if it has several documents")
    p.add_argument("--max-tokens", type=int, default=256, help="compare on the first N tokens (default 256)")
    p.add_argument("--steps", type=int, default=64, help="greedy steps (default 64)")
    p.add_argument("--prompt-tokens", type=int, default=32,
                   help="the greedy run starts from the text's first N tokens (default 32)")
    p.add_argument("--llama-cpp", action="store_true", help="run B in llama.cpp (pip install 'minillama[llamacpp]')")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def verify_command(args) -> None:
    from minillama.evaluate.perplexity import read_text

    for flag in ("max_tokens", "steps", "prompt_tokens"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    text = read_text(args)
    a = MinillamaRunner(args.a)
    n_ctx = max(args.max_tokens, args.prompt_tokens + args.steps) + 8
    b = LlamaCppRunner(args.b, n_ctx) if args.llama_cpp else MinillamaRunner(args.b, tokenizer_required=False)
    report = {"a": f"{args.a} ({a.engine})", "b": f"{args.b} ({b.engine})"}
    report |= compare(a, b, text, args.max_tokens, args.steps, args.prompt_tokens)
    print(json.dumps(report) if args.json else format_report(report))


def format_report(r: dict) -> str:
    g, p, lg, agree = r["greedy"], r["perplexity"], r["logits"], r["tokenizers_agree"]
    tokens = ("tokenizers agree" if agree else "B has no tokenizer (both read A's ids)" if agree is None
              else f"tokenizers differ from token {r['first_token_mismatch']} on (both read A's ids)")
    lines = [f"A  {r['a']}", f"B  {r['b']}", f"text          {r['tokens']} tokens; {tokens}",
             f"logits        max |A-B| {lg['max_diff']:.3g}, mean {lg['mean_diff']:.3g}; "
             f"same top token at {lg['top1_agree']:.1%} of positions",
             f"greedy        B picks A's token at {g['agree']}/{g['steps']} steps; identical for the first "
             f"{g['identical']}",
             f"perplexity    A {p['a']:.4f}  B {p['b']:.4f}  B-A {p['diff']:+.4f} ({p['diff'] / p['a']:+.3%})",
             f"KL(A||B)      mean {r['kl']['mean']:.3g}, max {r['kl']['max']:.3g} nats per token"]
    if r["layers_max_diff"] is None:
        lines.append("hidden states n/a (llama.cpp gives logits only)")
    else:
        lines += [f"layer {i:<7} max |A-B| {d:.3g}" for i, d in enumerate(r["layers_max_diff"])]
    return "\n".join(lines)

"""`minillama chat`: a conversation through the checkpoint's chat template, answers streamed as written.

Each turn renders the whole history with the template (templates.py: ChatML, Llama 2 [INST], or whatever
jinja the checkpoint carries) and generates from it; when the history outgrows the context, the oldest turns go.
"""

import sys

from minillama.config import GenerationConfig, UserError
from minillama.infer.generate import Timing
from minillama.infer.stream import stream, timing_line
from minillama.infer.templates import render_chat

HELP = "/reset clears the history, /exit (or Ctrl-D) quits"


def fit_history(tokenizer, messages: list[dict], budget: int, notice=None) -> list[int]:
    """Token ids of the conversation rendered for the assistant's next answer, at most `budget` long.

    While it is too long, the oldest turn (a user message and the answers to it) is dropped from
    `messages` itself, so later turns do not drop it again; a system message stays.
    """
    while True:
        # the template writes any BOS itself (Llama 2: "<s>[INST]"), so encode must not add another
        text = render_chat(tokenizer, messages, add_generation_prompt=True)
        ids = tokenizer.encode(text, bos=False, special=True)  # special: "<|im_start|>" is one token
        if len(ids) <= budget:
            return ids
        start = next(i for i, m in enumerate(messages) if m["role"] != "system")
        end = start + 1
        while end < len(messages) and messages[end]["role"] != "user":
            end += 1
        if end >= len(messages):  # only the newest message is left, and it alone does not fit
            raise UserError(f"the message takes {len(ids)} tokens with the chat template, but the context "
                            f"leaves {budget} after max_new_tokens: shorten it or lower --max-new-tokens")
        del messages[start:end]
        if notice:
            notice(f"(the conversation outgrew the {budget}-token context: dropped the oldest turn)")


def reply(model, tokenizer, messages: list[dict], config: GenerationConfig, write=None, notice=None):
    """Answer the conversation (its last message is the user's), streaming pieces to `write`; the answer
    is appended to `messages`. Returns (answer text, Timing)."""
    # the prompt must fit the context; answers too, unless a bounded cache (--window) runs past it
    budget = model.config.max_seq_len - (config.max_new_tokens if config.window is None else 1)
    if budget < 1:
        raise UserError(f"max_new_tokens={config.max_new_tokens} leaves no room for the conversation in the "
                        f"model's context of {model.config.max_seq_len} tokens: lower --max-new-tokens")
    ids = fit_history(tokenizer, messages, budget, notice)
    timing = Timing()
    answer = ""
    for piece in stream(model, tokenizer, [ids], config, timing):
        answer += piece.text
        if write:
            write(piece.text)
    messages.append({"role": "assistant", "content": answer})
    return answer, timing


def chat_loop(model, tokenizer, config: GenerationConfig, system: str | None = None, read=input,
              write=None, notice=None):
    """The interactive conversation: `read(prompt)` gives each user line; EOFError or /exit ends it."""
    write = write or (lambda text: print(text, end="", flush=True))
    notice = notice or (lambda text: print(text, file=sys.stderr))
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    notice(f"chat: {HELP}")
    while True:
        try:
            line = read("> ").strip()
        except EOFError:
            write("\n")
            return
        if line == "/exit":
            return
        if line == "/reset":
            messages = list(start)
            notice("(history cleared)")
            continue
        if line.startswith("/"):
            notice(f"unknown command {line.split()[0]}: {HELP}")
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        try:
            reply(model, tokenizer, messages, config, write, notice)
        except UserError as e:  # e.g. one message too long for the context: say so, keep chatting
            messages.pop()
            notice(f"error: {e}")
            continue
        write("\n")


def chat_flags(p) -> None:
    from minillama.checkpoint.load import model_flags
    from minillama.cli import add_fields

    model_flags(p)
    p.add_argument("--system", default=None, metavar="TEXT", help="a system message that opens the conversation")
    p.add_argument("--once", default=None, metavar="TEXT", help="answer this one message, print it and exit")
    add_fields(p, GenerationConfig, defaults={"max_new_tokens": 512})


def chat_command(args) -> None:
    from minillama.checkpoint.load import load_from_flags
    from minillama.cli import from_fields

    config = from_fields(GenerationConfig, args)  # validated before the (slow) load
    model, tokenizer = load_from_flags(args)
    if args.once is None:
        chat_loop(model, tokenizer, config, args.system)
        return
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.once})
    _, timing = reply(model, tokenizer, messages, config, write=lambda text: print(text, end="", flush=True),
                      notice=lambda text: print(text, file=sys.stderr))
    print()
    print(timing_line(timing), file=sys.stderr)

"""Chat templates: a conversation (a list of {"role", "content"} messages) rendered as the text a chat model
was trained on, the way Hugging Face renders the jinja template a checkpoint carries. For a checkpoint
without one: ChatML, or Llama 2's [INST] format for a SentencePiece vocabulary without ChatML tokens.
"""

import functools
import json
from datetime import datetime

from minillama.config import UserError

# Used when a checkpoint has no chat template of its own (default_template picks one).
# ChatML, as SmolLM2 and Qwen2 write it:
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama 2 chat (Meta's llama/generation.py): every user turn is "<s>[INST] ... [/INST]", the answer follows
# after a space and ends with "</s>"; a system message sits inside the first [INST] between <<SYS>> tags.
LLAMA2_TEMPLATE = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = '<<SYS>>\n' + messages[0]['content'] | trim + '\n<</SYS>>\n\n' %}"
    "{% set messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + (system if loop.first else '') + message['content'] | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)



def default_template(tokenizer) -> str:
    """Llama 2's [INST] format for a SentencePiece vocabulary with <s> and no ChatML tokens (Llama 2, our own
    trained tokenizers), ChatML otherwise."""
    if tokenizer.bos_token == "<s>" and tokenizer.token_id("<|im_start|>") is None:
        return LLAMA2_TEMPLATE
    return CHATML_TEMPLATE


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
    """The conversation as text, rendered as Hugging Face's apply_chat_template does: sandboxed jinja,
    trim_blocks + lstrip_blocks, the tokenizer's special tokens as variables."""
    import jinja2

    special = {name: getattr(tokenizer, name, None) or "" for name in ("bos_token", "eos_token", "pad_token",
                                                                       "unk_token")}
    try:
        template = _compiled(tokenizer.chat_template or default_template(tokenizer))
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **special, **extra)
    except jinja2.TemplateError as e:
        raise UserError(f"chat template: {e}") from None


@functools.lru_cache(maxsize=8)
def _compiled(source: str):
    """The jinja template, compiled once (compiling costs ~30 ms, rendering well under 1: fine-tuning data
    renders every example several times)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise UserError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    return env.from_string(source)

"""Chat templates: the checkpoint's own (SmolLM2's, against transformers), the ChatML and Llama 2 fallbacks,
and raise_exception as a one-line error."""

import pytest

from minillama.config import UserError
from minillama.infer.templates import render_chat
from minillama.tokenizer import Tokenizer

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def test_smollm2_chat_prompt_matches_transformers(smollm2_tokenizer, hf_smollm2_tokenizer):
    smollm2, reference = smollm2_tokenizer, hf_smollm2_tokenizer
    text = render_chat(smollm2, MESSAGES, add_generation_prompt=True)
    assert text == reference.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    ids = smollm2.encode(text, special=True)
    assert ids == reference(text)["input_ids"]
    assert ids[0] == smollm2.special_tokens["<|im_start|>"] and smollm2.add_bos is False
    assert smollm2.special_tokens["<|im_end|>"] in smollm2.eos_ids


def test_chat_template_fallback_is_chatml(gguf_vocab):
    tok = gguf_vocab("gpt-2")
    assert tok.chat_template is None
    assert render_chat(tok, MESSAGES) == (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(tok, MESSAGES, add_generation_prompt=False).endswith("<|im_end|>\n")


def test_chat_template_fallback_for_sentencepiece_is_llama2(gguf_vocab):
    tok = gguf_vocab("llama-spm")
    assert tok.chat_template is None and tok.bos_token == "<s>"
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": " Capital of France?"}]
    text = render_chat(tok, conversation)
    assert text == ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. </s>"
                    "<s>[INST] Capital of France? [/INST]")
    ids = tok.encode(text, bos=False, special=True)
    assert ids.count(tok.bos_id) == 2 and ids.count(tok.eos_id) == 1  # <s> and </s> are tokens, not text
    assert render_chat(tok, conversation[1:2]) == "<s>[INST] Hi [/INST]"


def test_chat_template_raise_exception_is_user_error(gguf_vocab):
    spm = gguf_vocab("llama-spm")
    tok = Tokenizer(spm.backend, bos_token="<s>", eos_token="</s>",
                    chat_template="{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}"
                                  "{% endif %}{{ bos_token }}[INST] {{ messages[0]['content'] }} [/INST]")
    assert render_chat(tok, MESSAGES) == "<s>[INST] What is the capital of France? [/INST]"
    with pytest.raises(UserError, match="user first"):
        render_chat(tok, [{"role": "assistant", "content": "hi"}])

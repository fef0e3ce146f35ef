"""SFT data: exactly the assistant's tokens carry loss on SmolLM2's real chat template (and on Llama 2's
[INST] fallback), bad lines name their file and line, packed examples see only themselves, and a batch
is a function of the step alone."""

import json
import os

import pytest
import torch

from minillama.config import ModelConfig, UserError
from minillama.data.examples import IGNORE, BadLines, Example, ExampleBatches, collate
from minillama.data.sft import encode_conversation, read_sft
from minillama.model import Llama
from minillama.train.loss import CausalLMLoss

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TWO_TURNS = [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": "What is the capital of France?"},
             {"role": "assistant", "content": "Paris."},
             {"role": "user", "content": "And of Italy?"},
             {"role": "assistant", "content": "Rome."}]


def learnt_runs(tokenizer, ids, learn) -> list[str]:
    """The text of each run of consecutive learnt tokens."""
    runs, current = [], []
    for i, keep in zip(ids, learn):
        if keep:
            current.append(i)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


def test_only_assistant_tokens_carry_loss_on_smollm2_template(smollm2_tokenizer, capsys):
    tok = smollm2_tokenizer
    ids, learn = encode_conversation(tok, TWO_TURNS)
    with capsys.disabled():  # shown with -s: [brackets] mark the tokens that carry loss
        print("\n" + "".join(f"[{tok.decode([i])}]" if keep else tok.decode([i]) for i, keep in zip(ids, learn)))
    assert learnt_runs(tok, ids, learn) == ["Paris.<|im_end|>", "Rome.<|im_end|>"]
    answers = len(tok.encode("Paris.")) + len(tok.encode("Rome.")) + 2  # + one <|im_end|> each
    assert sum(learn) == answers
    # the default system prompt is not there: the conversation has its own; the ids are generation's ids
    assert ids == tok.encode(tok.decode(ids), bos=False, special=True)


def test_mask_equals_transformers_assistant_mask(smollm2_tokenizer, hf_smollm2_tokenizer):
    """transformers computes the same mask from {% generation %} tags, which SmolLM2's template lacks: here
    they are added around each answer and its <|im_end|>."""
    reference = hf_smollm2_tokenizer
    tagged = smollm2_tokenizer.chat_template.replace(
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
        "{% if message['role'] == 'assistant' %}{{'<|im_start|>assistant\n'}}{% generation %}"
        "{{message['content'] + '<|im_end|>'}}{% endgeneration %}{{'\n'}}{% else %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endif %}")
    assert tagged != smollm2_tokenizer.chat_template
    out = reference.apply_chat_template(TWO_TURNS, chat_template=tagged, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, learn = encode_conversation(smollm2_tokenizer, TWO_TURNS)
    assert out["input_ids"] == ids
    assert out["assistant_masks"] == [int(x) for x in learn]


def test_llama2_template_learns_the_answer_and_eos(gguf_vocab):
    tok = gguf_vocab("llama-spm")  # no chat template: Llama 2's [INST] fallback
    ids, learn = encode_conversation(tok, TWO_TURNS)
    pieces = [tok.backend.id_to_token(i) for i, keep in zip(ids, learn) if keep]
    assert pieces == ["▁Paris", ".", "▁", "</s>", "▁Rome", ".", "▁", "</s>"]  # " Paris. </s>": the answer's turn


def test_prompt_completion_is_one_user_turn(smollm2_tokenizer, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "2+2?", "completion": "4"}) + "\n\n" +
                    json.dumps({"messages": [{"role": "user", "content": "2+2?"},
                                             {"role": "assistant", "content": "4"}]}) + "\n")
    first, second = read_sft(data, smollm2_tokenizer, 64, BadLines())
    assert first.inputs == second.inputs and first.targets == second.targets
    assert first.source.endswith("pairs.jsonl line 1") and second.source.endswith("line 3")
    learnt = [t for t in first.targets if t != IGNORE]
    assert smollm2_tokenizer.decode(learnt) == "4<|im_end|>"


BAD = [('{"prompt": "hi", "completion": "hello"', "line 2: not valid JSON"),
       ('{"messages": [{"role": "user", "content": "hi"}]}', "line 2: no assistant turn"),
       ('{"messages": [{"role": "robot", "content": "hi"}]}', "line 2: message 0 is not"),
       ('{"text": "no conversation"}', 'line 2: neither "messages"'),
       (json.dumps({"prompt": "word " * 100, "completion": "x"}), "line 2: 1"),  # 1xx tokens
       ('[1, 2]', "line 2: a JSON list")]


@pytest.mark.parametrize("line, message", BAD)
def test_bad_line_stops_naming_file_and_line_or_is_skipped(smollm2_tokenizer, tmp_path, capsys, line, message):
    data = tmp_path / "data.jsonl"
    good = json.dumps({"prompt": "hi", "completion": "hello"})
    data.write_text(f"{good}\n{line}\n{good}\n")
    with pytest.raises(UserError, match="--on-bad-line skip") as stopped:
        read_sft(data, smollm2_tokenizer, 64, BadLines("stop"))
    assert str(stopped.value).startswith(f"{data} {message}")
    bad = BadLines("skip")
    assert len(read_sft(data, smollm2_tokenizer, 64, bad)) == 2 and bad.skipped == 1
    assert f"{data} line 2" in capsys.readouterr().err


def test_packed_examples_see_only_themselves():
    """A row of two packed examples gives each the logits and loss it has alone: the block-diagonal mask
    keeps attention inside each one, and rotary positions restart at 0."""
    config = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=32)
    model = Llama(config).init_weights(0).eval()
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, 64, (n,), generator=g).tolist() for n in (5, 7))
    examples = [Example(a, [IGNORE] * 2 + a[2:], "a"), Example(b, b[::-1], "b")]
    packed = collate([examples], pad_id=0)
    assert packed["inputs"].shape == (1, 12) and packed["attention_mask"].shape == (1, 1, 12, 12)
    with torch.no_grad():
        together = model(packed["inputs"], packed["attention_mask"])[0]  # (12, V)
        torch.testing.assert_close(together[:5], model(torch.tensor([a]))[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(together[5:], model(torch.tensor([b]))[0], atol=1e-5, rtol=0)
        loss = CausalLMLoss(model)(**packed)
        alone = [CausalLMLoss(model)(**collate([[e]], 0)) for e in examples]
    counts = [3, 7]  # targets that are not IGNORE
    torch.testing.assert_close(loss, (alone[0] * 3 + alone[1] * 7) / sum(counts), atol=1e-5, rtol=0)


def test_batches_are_a_function_of_the_step_and_cover_every_example():
    train = [Example([i] * (1 + i % 5), [i] * (1 + i % 5), str(i)) for i in range(23)]
    val = train[:3]
    for pack_len in (None, 8):
        one = ExampleBatches(train, val, 4, seed=1, pad_id=0, pack_len=pack_len)
        other = ExampleBatches(train, val, 4, seed=1, pad_id=0, pack_len=pack_len)
        later = other.batch(9)  # asked out of order, from a fresh object: what a resumed run does
        assert all(torch.equal(later[k], one.batch(9)[k]) for k in later)
        halves = [one.batch(9, slice(0, 2)), one.batch(9, slice(2, 4))]  # two processes' rows
        assert sorted(set(torch.cat([h["inputs"].flatten() for h in halves]).tolist()) - {0}) == \
            sorted(set(later["inputs"].flatten().tolist()) - {0})
        seen = {int(t) for step in range(6) for t in one.batch(step)["inputs"].flatten()}
        assert seen >= set(range(1, 23))  # the first epoch's rows visit every example (id 0 is also padding)
        assert len(one.validation()) == 1 and one.validation()[0]["inputs"].shape[0] == 4  # 3 rows repeated

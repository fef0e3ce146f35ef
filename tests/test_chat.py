"""Chat: history trimming, /reset and /exit, the --once CLI on a tiny checkpoint and on SmolLM2."""

import pytest
from test_generate import FakeTokenizer, ScriptedModel, cli_run, script_of, tiny_folder  # noqa: F401

from minillama.config import GenerationConfig, UserError
from minillama.infer.chat import chat_loop, fit_history, reply
from minillama.infer.templates import render_chat

GREEDY = GenerationConfig(max_new_tokens=20, temperature=0)


def conversation(turns, system="be brief"):
    messages = [{"role": "system", "content": system}] if system else []
    for i in range(turns):
        messages += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    return messages + [{"role": "user", "content": "last question"}]


def test_fit_history_drops_the_oldest_turns_and_keeps_the_system_message():
    tok = FakeTokenizer()
    messages = conversation(3)
    full = len(tok.encode(render_chat(tok, messages), bos=False))
    notices = []
    ids = fit_history(tok, messages, full - 1, notices.append)
    assert len(ids) <= full - 1
    assert [m["content"] for m in messages] == ["be brief", "question 1", "answer 1", "question 2", "answer 2",
                                                "last question"]
    assert len(notices) == 1 and "dropped the oldest turn" in notices[0]
    assert fit_history(tok, messages, full, notices.append) == ids and len(notices) == 1  # fits now: untouched


def test_fit_history_keeps_a_fitting_conversation_and_rejects_one_message_too_long():
    tok = FakeTokenizer()
    messages = conversation(2, system=None)
    rendered = tok.encode(render_chat(tok, messages), bos=False)
    assert fit_history(tok, list(messages), 10_000) == rendered
    with pytest.raises(UserError, match="shorten it"):
        fit_history(tok, conversation(2), 5)


def test_reply_streams_the_answer_and_records_it():
    messages = conversation(1)
    written = []
    answer, timing = reply(ScriptedModel(script_of("Paris.", end=(258,))), FakeTokenizer(), messages, GREEDY,
                           written.append)
    assert answer == "Paris." == "".join(written)
    assert messages[-1] == {"role": "assistant", "content": "Paris."}
    assert timing.decode_tokens == len("Paris.")


def test_chat_loop_commands_reset_and_context_overflow():
    model = ScriptedModel(script_of("ok", end=(258,)), max_seq_len=140)  # two turns fit, three do not
    prompt_lengths = []
    real_forward = model.hidden_states

    def recording(ids, mask, cache):  # the prompt length of every prefill tells what history was sent
        if cache is not model.cache:
            prompt_lengths.append(ids.shape[1])
        return real_forward(ids, mask, cache)

    model.hidden_states = recording
    lines = iter(["hello", "/bogus", "", "hello", "/reset", "hello", "hello", "hello", "x" * 200, "/exit",
                  "never read"])
    written, notices = [], []
    chat_loop(model, FakeTokenizer(), GREEDY, system="sys", read=lambda prompt: next(lines),
              write=written.append, notice=notices.append)
    assert "".join(written) == "ok\n" * 5
    first = prompt_lengths[0]
    assert prompt_lengths[1] > first  # the second turn carries the first
    assert prompt_lengths[2] == first  # /reset forgot it
    assert max(prompt_lengths) <= 140 - GREEDY.max_new_tokens  # the oldest turns went to keep it in context
    assert any("unknown command /bogus" in n for n in notices)
    assert any("history cleared" in n for n in notices)
    assert any("dropped the oldest turn" in n for n in notices)
    assert any(n.startswith("error: ") and "shorten it" in n for n in notices)  # too long alone; chat goes on


def test_chat_loop_ends_on_end_of_input():
    def read(prompt):
        raise EOFError

    written = []
    chat_loop(ScriptedModel([258]), FakeTokenizer(), GREEDY, read=read, write=written.append, notice=lambda t: None)
    assert written == ["\n"]


def test_cli_once_on_a_tiny_checkpoint(tiny_folder, capsys):  # noqa: F811
    code, out, err = cli_run(capsys, "chat", tiny_folder, "--once", "hi", "--system", "be brief",
                             "--max-new-tokens", "4", "--temperature", "0", "--ignore-eos")
    assert code == 0 and out.endswith("\n") and "decode" in err


@pytest.mark.parametrize("extra", [
    ["--temperature", "-1"],
    ["--top-p", "2"],
    ["--max-new-tokens", "128"],  # the whole 128-token context: no room for the conversation
    ["--once", "x" * 200],  # the message alone is longer than the context
    ["--system", "s", "--once", "hi", "--max-new-tokens", "127"],  # the template's tokens fit nowhere
])
def test_cli_bad_input_exits_2_with_one_line(tiny_folder, capsys, extra):  # noqa: F811
    argv = ["chat", tiny_folder, "--max-new-tokens", "4", *extra]
    if "--once" not in extra:
        argv += ["--once", "hi"]
    code, out, err = cli_run(capsys, *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("minillama chat: error: ")


def test_cli_once_smollm2_knows_the_capital_of_france(capsys):
    from minillama.data.assets import smollm2_gguf

    code, out, err = cli_run(capsys, "chat", str(smollm2_gguf()), "--once", "What is the capital of France?",
                             "--temperature", "0", "--max-new-tokens", "48")
    assert code == 0
    assert "Paris" in out

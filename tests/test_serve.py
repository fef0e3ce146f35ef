"""`minillama serve` over real HTTP on a random loopback port: the official openai client, 32 concurrent streams
against each request alone, disconnects, bad requests in OpenAI's error shape, and a fuzz of the request
schema. The model is a tiny random one with a byte-level tokenizer, saved and loaded as a user's would be."""

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from minillama.config import ModelConfig
from minillama.serve.app import ServeConfig
from test_engine import ascii_stop
from test_generate import byte_tokenizer

SERVE_EXTRA = "needs the serve extra and the openai client: pip install -e '.[test]'"
openai = pytest.importorskip("openai", reason=SERVE_EXTRA)
pytest.importorskip("fastapi", reason=SERVE_EXTRA)
uvicorn = pytest.importorskip("uvicorn", reason=SERVE_EXTRA)

CONFIG = ModelConfig(vocab_size=257, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=256,
                     bos_token_id=None, eos_token_id=256)


@contextlib.contextmanager
def live(app):
    """uvicorn serving `app` in a thread on a free loopback port: yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, tokenizer) through the loader, from a folder holding a tiny random model."""
    from minillama.checkpoint import load_model_and_tokenizer, save_model
    from minillama.model import Llama

    folder = save_model(Llama(CONFIG).init_weights(0), tmp_path_factory.mktemp("serve") / "tiny", byte_tokenizer())
    return load_model_and_tokenizer(str(folder))


def start_server(tiny, slow: float = 0.0, **settings):
    """An app over a fresh engine; `slow` seconds of sleep per forward pass make answers take a while."""
    from minillama.infer.engine import Engine
    from minillama.serve.app import create_app

    model, tokenizer = tiny
    engine_settings = {k: settings.pop(k) for k in ("max_running", "max_queue") if k in settings}
    if slow:
        model = SlowModel(model, slow)
    engine = Engine(model, tokenizer, kv_cache_mb=4, **engine_settings).start()
    return create_app(ServeConfig(**settings), "tiny", engine), engine


class SlowModel:
    """The model, with a pause in each forward pass: a stream that lasts long enough to walk away from."""

    def __init__(self, model, seconds):
        self.inner, self.seconds = model, seconds
        self.config, self.device, self.model, self.logits = model.config, model.device, model.model, model.logits

    def hidden_states(self, *args):
        time.sleep(self.seconds)
        return self.inner.hidden_states(*args)


@pytest.fixture(scope="module")
def server(tiny):
    app, engine = start_server(tiny, max_tokens=16)
    with live(app) as url:
        yield url, engine
    engine.stop()


def client(url, **kw):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, **kw)


def post(url, path, body, headers=None, raw=None):
    """(status, parsed JSON or text) of a POST, errors included."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json",
                                                                      **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def greedy(**kw):
    return dict(model="tiny", temperature=0, extra_body={"ignore_eos": True}, **kw)


def test_openai_client_chat_and_completions_plain_and_streamed(server):
    url, _ = server
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    plain = c.chat.completions.create(messages=messages, max_tokens=12, **greedy())
    assert plain.choices[0].finish_reason == "length" and plain.usage.completion_tokens == 12
    assert plain.usage.prompt_tokens > 10 and plain.usage.total_tokens == plain.usage.prompt_tokens + 12
    chunks = list(c.chat.completions.create(messages=messages, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}, **greedy()))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == plain.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12

    text = c.completions.create(prompt="Once upon", max_tokens=10, logprobs=2, **greedy())
    assert text.usage.prompt_tokens == len("Once upon") and text.usage.completion_tokens == 10
    assert len(text.choices[0].logprobs.token_logprobs) == 10 and len(text.choices[0].logprobs.top_logprobs[0]) == 2
    pieces = list(c.completions.create(prompt="Once upon", max_tokens=10, stream=True, **greedy()))
    assert "".join(p.choices[0].text for p in pieces) == text.choices[0].text
    ids = c.completions.create(prompt=byte_tokenizer().encode("Once upon"), max_tokens=10, **greedy())
    assert ids.choices[0].text == text.choices[0].text
    default = c.completions.create(model="tiny", prompt="Once upon", extra_body={"ignore_eos": True})
    assert default.usage.completion_tokens == 16  # the server's --max-tokens


def test_stop_sequences_never_reach_the_client(server):
    url, _ = server
    c = client(url)
    full = c.completions.create(prompt="The end", max_tokens=40, **greedy()).choices[0].text
    stop = ascii_stop(full)
    cut = full.index(stop)
    for stops in (stop, ["\x00never", stop]):
        answer = c.completions.create(prompt="The end", max_tokens=40, stop=stops, **greedy()).choices[0]
        assert answer.text == full[:cut] and answer.finish_reason == "stop"
        pieces = [p.choices[0].text for p in c.completions.create(prompt="The end", max_tokens=40, stop=stops,
                                                                  stream=True, **greedy())]
        assert "".join(pieces) == full[:cut]


def test_seed_makes_sampling_reproducible(server):
    url, _ = server
    c = client(url)

    def sample(seed):
        return c.completions.create(model="tiny", prompt="hi", max_tokens=24, temperature=1.0, seed=seed).choices[0].text

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_32_concurrent_streams_each_equal_to_the_request_alone(server):
    url, engine = server
    c = client(url, timeout=120)
    asks = [dict(messages=[{"role": "user", "content": f"question {i}" + " and more" * (i % 5)}],
                 max_tokens=5 + 3 * (i % 9)) for i in range(32)]

    def ask(kw):
        text, finish, usage = "", None, None
        for chunk in c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw,
                                               **greedy()):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            usage = chunk.usage or usage
        return text, finish, usage.completion_tokens

    alone = [ask(kw) for kw in asks]
    peak = engine.stats["peak_running"]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(ask, asks))
    assert together == alone
    assert all(finish == "length" and n == kw["max_tokens"] for (_, finish, n), kw in zip(together, asks))
    assert peak == 1 and engine.stats["peak_running"] >= 8  # they did share the batch
    assert engine.gauges()["running"] == 0 and len(engine.pool.free) == engine.pool.n_blocks


def metric(url, name):
    with urllib.request.urlopen(url + "/metrics") as r:
        lines = r.read().decode().splitlines()
    return next(float(line.split()[-1]) for line in lines if line.startswith(f"minillama_{name}"))


def test_a_client_that_disconnects_frees_its_slot_and_a_full_queue_answers_429(tiny):
    app, engine = start_server(tiny, slow=0.01, max_running=1, max_queue=1)
    with live(app) as url:
        c = client(url)
        stream = c.completions.create(prompt="go", max_tokens=200, stream=True, **greedy())
        next(iter(stream)), next(iter(stream))
        waiting = c.completions.with_raw_response.create  # fills the queue of one behind the stream
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(waiting, prompt="next", max_tokens=3, **greedy())
            while engine.gauges()["queue_length"] < 1:
                time.sleep(0.005)
            status, body = post(url, "/v1/completions", {"prompt": "one more", "max_tokens": 3})
            assert status == 429 and body["error"]["code"] == "queue_full"
            stream.close()  # the client walks away: the next request gets the slot
            served = queued.result(timeout=60).parse()
        assert served.usage.completion_tokens == 3
        assert metric(url, 'sequences_total{end="cancelled"}') == 1
        assert metric(url, "generation_tokens_total") < 100 and metric(url, "running") == 0
    engine.stop()
    assert len(engine.pool.free) == engine.pool.n_blocks


BAD = [  # (body or raw bytes, status, param, words in the message)
    (b"{not json", 400, None, "malformed JSON"),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model", "does not exist"),
    ({"prompt": "hi", "temperature": 3}, 400, "temperature", "less than or equal to 2"),
    ({"prompt": "hi", "top_p": 0}, 400, "top_p", "greater than 0"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ({"prompt": "hi", "max_tokens": 300}, 400, "max_tokens", "context is 256 tokens, but the prompt has 2"),
    ({"prompt": "hi", "n": 2}, 400, "n", "only n=1"),
    ({"prompt": "hi", "stop": [""]}, 400, "stop", "non-empty"),
    ({"prompt": [1, 2, 999]}, 400, "prompt", "outside the vocabulary"),
    ({"prompt": ""}, 400, "prompt", "at least 1"),
    ({"messages": []}, 400, "messages", "at least 1"),
]


@pytest.mark.parametrize("body, status, param, words", BAD)
def test_bad_requests_get_their_status_in_openai_shape(server, body, status, param, words):
    url, engine = server
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    got, answer = post(url, path, None, raw=body if isinstance(body, bytes) else json.dumps(body).encode())
    assert got == status and set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["param"] == param and words in answer["error"]["message"]
    assert engine.gauges()["running"] == 0


def test_loading_api_key_and_body_limit(tiny):
    from minillama.serve.app import create_app

    _, engine = start_server(tiny)
    app = create_app(ServeConfig(api_key="sekret", max_body_kb=2), "tiny")  # no engine yet: loading
    with live(app) as url:
        assert post(url, "/v1/completions", {"prompt": "hi"}, {"Authorization": "Bearer sekret"})[0] == 503
        with pytest.raises(urllib.error.HTTPError, match="503"):
            urllib.request.urlopen(url + "/health")
        app.state.engine = engine
        assert urllib.request.urlopen(url + "/health").status == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret2"}):
            status, answer = post(url, "/v1/completions", {"prompt": "hi"}, headers)
            assert status == 401 and answer["error"]["type"] == "authentication_error"
        key = {"Authorization": "Bearer sekret"}
        assert post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2}, key)[0] == 200
        status, answer = post(url, "/v1/completions", {"prompt": "x" * 3000}, key)
        assert status == 413 and "2048 bytes" in answer["error"]["message"]
        assert urllib.request.urlopen(url + "/").read().startswith(b"<!doctype html>")  # the page needs no key
    engine.stop()


def test_fuzzed_requests_never_get_a_500(server):
    """Property: whatever JSON arrives (right fields with wrong values, wrong types, unknown fields), the
    answer is a 200 or a 4xx in OpenAI's shape, and no request is left running."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    url, engine = server
    leaf = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12)
    value = st.recursive(leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6),
                                                                                           inner, max_size=3),
                         max_leaves=6)
    good = {"prompt": st.sampled_from(["hi", [1, 2, 3]]), "max_tokens": st.integers(-2, 300),
            "messages": st.just([{"role": "user", "content": "hi"}]), "temperature": st.floats(-1, 3),
            "top_p": st.floats(-0.5, 1.5), "top_k": st.integers(-1, 400), "min_p": st.floats(-1, 2),
            "seed": st.integers(-2**65, 2**65), "stop": st.sampled_from(["a", ["b", "c"], [], ""]),
            "stream": st.booleans(), "stream_options": st.just({"include_usage": True}), "n": st.integers(0, 3),
            "logprobs": st.integers(-1, 30) | st.booleans(), "top_logprobs": st.integers(-1, 30),
            "model": st.sampled_from(["tiny", "other"]), "max_completion_tokens": st.integers(-1, 300),
            "repetition_penalty": st.floats(-1, 20), "ignore_eos": st.booleans()}
    field = st.sampled_from(sorted(good))
    body = st.dictionaries(field, value, max_size=4).flatmap(
        lambda wrong: st.fixed_dictionaries({}, optional=good).map(lambda right: right | wrong))

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(body=body, chat=st.booleans())
    def check(body, chat):
        status, answer = post(url, "/v1/chat/completions" if chat else "/v1/completions", body)
        assert status == 200 or 400 <= status < 500, (status, answer)
        if status != 200:
            assert set(answer["error"]) == {"message", "type", "param", "code"}

    check()
    deadline = time.time() + 30
    while engine.gauges()["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert engine.gauges()["running"] == 0 and len(engine.pool.free) == engine.pool.n_blocks


def test_bench_serve_measures_streaming_clients_and_reports_ratios(server):
    """`minillama bench serve`'s client side against this server (llama.cpp's server is the other contender
    in the real run): every request is counted, the latencies are ordered, the ratio is of the tok/s."""
    from minillama.bench.serve import format_table, run_clients

    url, engine = server
    port = int(url.rsplit(":", 1)[1])
    row = run_clients(port, 4, 2, 6, count=lambda text: len(text.encode()))  # byte tokenizer: a byte a token
    assert row["requests"] == 8 and 0 < row["tokens"] <= 8 * 6 * 4 and row["tok_s"] > 0
    assert row["ttft"] <= row["p50"] <= row["p95"]
    table = [{"contender": "minillama", "clients": 4, **row},
             {"contender": "llama.cpp", "clients": 4, **row | {"tok_s": row["tok_s"] / 2}}]
    assert [line.split("|")[9].strip() for line in format_table(table).splitlines()[2:4]] == ["2.00x", "1.00x"]
    assert engine.gauges()["running"] == 0

"""tegaki serve: the engine, the chat templates, the OpenAI-shaped API and the page's data.

In-process checks go through Starlette's test client; the end-to-end ones (marked slow) start a
real `tegaki serve` process on 127.0.0.1 and talk to it with the official `openai` client.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("starlette", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("jinja2", reason="the serve extra is not installed: pip install -e '.[serve]'")

from serve_models import PASSAGE, health, running_server, write_model_folder
from starlette.testclient import TestClient

from tegaki.analysis.attention import attention_maps
from tegaki.analysis.params import count_parameters
from tegaki.generate import Decoding, generate_tokens
from tegaki.sampling import SamplingSettings, sample_next, sampling_distribution
from tegaki.serve.app import create_app
from tegaki.serve.engine import DoneEvent, Engine, GenerationRequest, TokenEvent
from tegaki.serve.served import load_served

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "吾輩は猫である。"  # the model continues it with the rest of the passage
CONTINUATION = PASSAGE[len(PROMPT) :]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_model_folder(tmp_path_factory.mktemp("serve") / "tiny-ja")


@pytest.fixture(scope="module")
def served(folder):
    return load_served(str(folder))


@pytest.fixture(scope="module")
def engine(served):
    engine = Engine(served.model, served.tokenizer)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def client(served, engine):
    with TestClient(create_app(served, engine), base_url="http://127.0.0.1") as client:
        yield client


def run_alone(engine, request) -> tuple[list[int], str]:
    """(token ids, reason) of one request, read in order."""
    ids, reason = [], None
    for event in engine.stream(request):
        if isinstance(event, TokenEvent):
            ids.append(event.token_id)
        else:
            reason = event.reason
    return ids, reason


# -------------------------------------------------------------------------------------------------
# The engine
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        SamplingSettings(temperature=0),
        SamplingSettings(temperature=0.9, top_k=20),
        SamplingSettings(temperature=1.2, top_p=0.8, presence_penalty=0.5),
    ],
)
def test_the_engine_samples_what_generate_tokens_samples(served, engine, settings):
    """The engine's turns are the library's decoding loop for a batch of one: same seed, same tokens."""
    prompt = served.tokenizer.encode(PROMPT)
    ids, _ = run_alone(engine, GenerationRequest(prompt, 30, settings, seed=7))
    generator = torch.Generator().manual_seed(7)
    expected = [
        int(t[0]) for t in generate_tokens(served.model, torch.tensor([prompt]), 30, settings, generator=generator)
    ]
    assert ids == expected


def test_the_engine_steps_through_the_librarys_decoding_loop(served, engine, monkeypatch):
    """One decoding loop: every token after the first is a `Decoding.step` of tegaki.generate."""
    steps = []
    real = Decoding.step
    monkeypatch.setattr(Decoding, "step", lambda self, token: steps.append(int(token[0])) or real(self, token))
    ids, reason = run_alone(
        engine, GenerationRequest(served.tokenizer.encode(PROMPT), 6, SamplingSettings(temperature=0))
    )
    assert reason == "length" and steps == ids[:-1]


def test_requests_at_once_get_what_each_gets_alone(served, engine):
    """Taking turns never mixes requests: 10 at once, each equal to its lone run."""
    tok = served.tokenizer
    requests = [
        GenerationRequest(tok.encode(p), 12 + i, SamplingSettings(temperature=0.8 + 0.05 * i), seed=i)
        for i, p in enumerate(([PROMPT, "名前は", "The cat", "どこで", "a", "吾輩"] * 2)[:10])
    ]
    alone = [run_alone(engine, r) for r in requests]
    results: dict[int, list] = {i: [] for i in range(len(requests))}
    done = threading.Event()
    remaining = [len(requests)]
    lock = threading.Lock()

    def sink(i):
        def put(event):
            results[i].append(event)
            if isinstance(event, DoneEvent):
                with lock:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        done.set()

        return put

    for i, r in enumerate(requests):
        engine.submit(r, sink(i))
    assert done.wait(timeout=60)
    for i, events in results.items():
        assert [e.token_id for e in events if isinstance(e, TokenEvent)] == alone[i][0]


def test_a_cancelled_request_stops_at_its_next_turn(served, engine):
    before = engine.stats["tokens"]
    events = engine.stream(GenerationRequest(served.tokenizer.encode("a"), 100, SamplingSettings(), seed=1))
    next(events)
    events.close()  # the reader goes away
    for _ in range(200):
        if not engine.busy:
            break
        threading.Event().wait(0.01)
    assert not engine.busy
    assert engine.stats["tokens"] - before < 100


def test_the_engine_refuses_what_the_model_cannot_do(served, engine):
    with pytest.raises(Exception, match="max_tokens"):
        engine.submit(GenerationRequest([1, 2], 0), print)
    with pytest.raises(Exception, match="context"):
        engine.submit(GenerationRequest([1] * 200, 1), print)


def test_a_one_token_request_overtakes_a_large_group(served):
    """Fair shares: with one place and a group of 6 long requests decoding, a lone 1-token request
    gets a place at the next turn, and places freed later go to the group with the fewest."""
    engine = Engine(served.model, served.tokenizer, max_active=2)
    finished: list[str] = []
    done = threading.Event()

    def sink(name):
        def put(event):
            if isinstance(event, DoneEvent):
                finished.append(name)
                if len(finished) == 7:
                    done.set()

        return put

    try:
        prompt = served.tokenizer.encode("a")
        engine.submit_all([(GenerationRequest(prompt, 40, SamplingSettings(temperature=0)), sink("big"))] * 6)
        engine.submit(GenerationRequest(prompt, 1, SamplingSettings(temperature=0)), sink("small"))
        assert done.wait(timeout=60)
        assert finished.index("small") == 0, finished
    finally:
        engine.close()


def test_the_engine_refuses_work_beyond_max_queued(served):
    from tegaki.serve.engine import EngineFull

    engine = Engine(served.model, served.tokenizer, max_active=1, max_queued=3)
    try:
        request = GenerationRequest(served.tokenizer.encode("a"), 50, SamplingSettings(temperature=0))
        jobs = engine.submit_all([(request, lambda e: None)] * 2)
        with pytest.raises(EngineFull, match="3 at most"):
            engine.submit_all([(request, lambda e: None)] * 2)  # all or none: 2 + 2 > 3
        assert engine.queued == 2
        for job in jobs:
            job.cancel()
        for _ in range(500):  # bounded: 5 s
            if engine.queued == 0:
                break
            threading.Event().wait(0.01)
        assert engine.queued == 0  # the cancelled give their places back
        engine.submit_all([(request, lambda e: None)] * 3)[0].cancel()
    finally:
        engine.close()


def test_a_finished_request_is_not_kept_alive_by_the_engine(served):
    """Once a request is done and the engine waits for work, nothing of it stays referenced: a
    server's reader (its sink) holds the whole API request, every choice and its unread events."""
    import gc
    import weakref

    class Reader:
        def __init__(self):
            self.done = threading.Event()

        def __call__(self, event):
            if isinstance(event, DoneEvent):
                self.done.set()

    engine = Engine(served.model, served.tokenizer)
    try:
        readers = [Reader() for _ in range(3)]
        request = GenerationRequest(served.tokenizer.encode("a"), 4, SamplingSettings(temperature=0))
        engine.submit_all([(request, reader) for reader in readers])
        assert all(reader.done.wait(timeout=60) for reader in readers)
        refs = [weakref.ref(reader) for reader in readers]
        del readers
        for _ in range(100):  # bounded: 5 s; the engine thread leaves its turn just after the last event
            gc.collect()
            if all(ref() is None for ref in refs):
                break
            threading.Event().wait(0.05)
        assert [ref() for ref in refs] == [None] * 3
    finally:
        engine.close()


def test_a_text_refused_before_tokenizing_really_has_too_many_tokens(served):
    """The bound encode_within refuses by: no text has fewer tokens than characters / (longest token x
    the normalization slack)."""
    from tegaki.serve.api import NORMALIZATION_SLACK

    for text in (PASSAGE * 20, "a" * 5000, "吾輩" * 999, " " * 3000, "ｱｲｳＡＢＣ" * 300):
        tokens = len(served.tokenizer.encode(text))
        assert tokens * served.longest_token * NORMALIZATION_SLACK >= len(text)


@pytest.mark.parametrize(
    "settings",
    [
        SamplingSettings(temperature=0.7, top_k=5),
        SamplingSettings(top_p=0.5),
        SamplingSettings(temperature=1.5, min_p=0.1),
        SamplingSettings(temperature=0),
    ],
)
def test_the_bars_show_the_distribution_sample_next_draws_from(settings):
    logits = torch.randn(1, 300) * 3
    dist = sampling_distribution(logits[0], settings)
    assert float(dist.sum()) == pytest.approx(1.0, abs=1e-5)
    for seed in range(5):
        drawn = sample_next(logits, settings, generator=torch.Generator().manual_seed(seed))
        if settings.temperature == 0:
            assert float(dist[drawn]) == 1.0
        else:
            again = torch.multinomial(dist[None], 1, generator=torch.Generator().manual_seed(seed))[0]
            assert int(again) == int(drawn)


# -------------------------------------------------------------------------------------------------
# The API, in process
# -------------------------------------------------------------------------------------------------


def complete(client, **body):
    response = client.post("/v1/completions", json={"model": "tiny-ja", **body})
    assert response.status_code == 200, response.text
    return response.json()


def sse(client, path, body) -> list[dict]:
    """The chunks of a streamed answer; checks that it ends with [DONE]."""
    with client.stream("POST", path, json={"model": "tiny-ja", "stream": True, **body}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        data = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_a_greedy_completion_continues_the_passage(client):
    out = complete(client, prompt=PROMPT, max_tokens=20, temperature=0)
    choice = out["choices"][0]
    assert CONTINUATION.startswith(choice["text"].rstrip("\ufffd")) and len(choice["text"]) > 10
    assert choice["finish_reason"] == "length"
    assert out["object"] == "text_completion"
    assert out["usage"]["completion_tokens"] == 20
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + 20


def test_streamed_japanese_is_never_broken(client):
    """The pieces of a stream are whole characters: they join to the unstreamed text, and a
    continuation that is valid Japanese has no replacement character anywhere."""
    whole = complete(client, prompt=PROMPT, max_tokens=30, temperature=0)["choices"][0]["text"]
    for body in ({}, {"logprobs": 2}):
        chunks = sse(client, "/v1/completions", {"prompt": PROMPT, "max_tokens": 30, "temperature": 0, **body})
        pieces = [c["choices"][0]["text"] for c in chunks]
        assert "".join(pieces) == whole
        assert all("\ufffd" not in p for p in pieces[:-1]), pieces
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_a_stop_string_cuts_the_text_streamed_or_not(client):
    body = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0, "stop": ["まだ"]}
    out = complete(client, **body)
    assert out["choices"][0]["text"] == "名前は"
    assert out["choices"][0]["finish_reason"] == "stop"
    chunks = sse(client, "/v1/completions", body)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "名前は"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_completion_logprobs(client, served):
    out = complete(client, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3)
    lp = out["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 8
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) == 3 and logprob <= 0
        assert max(top, key=top.get) == token  # greedy: the chosen token is the most likely
    assert lp["tokens"][0].startswith("bytes:")  # 名 is split across byte-level tokens


def test_n_choices_with_a_seed_are_each_reproducible(client):
    both = complete(client, prompt="The", max_tokens=10, n=2, seed=5, temperature=1.0)["choices"]
    first = complete(client, prompt="The", max_tokens=10, seed=5, temperature=1.0)["choices"][0]
    second = complete(client, prompt="The", max_tokens=10, seed=6, temperature=1.0)["choices"][0]
    assert [c["text"] for c in both] == [first["text"], second["text"]]
    assert [c["index"] for c in both] == [0, 1]


def test_chat_uses_the_template_and_stops_at_the_end_of_turn(client):
    body = {"messages": [{"role": "user", "content": "こんにちは"}], "temperature": 0}
    out = client.post("/v1/chat/completions", json={"model": "tiny-ja", **body}).json()
    choice = out["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "吾輩は猫である。"}
    assert choice["finish_reason"] == "stop"
    chunks = sse(client, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "吾輩は猫である。"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == out["usage"]


def test_chat_logprobs(client):
    body = {
        "model": "tiny-ja",
        "messages": [{"role": "user", "content": "こんにちは"}],
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
    }
    content = client.post("/v1/chat/completions", json=body).json()["choices"][0]["logprobs"]["content"]
    assert bytes(b for entry in content for b in entry["bytes"]).decode() == "吾輩は猫である。"
    assert all(len(entry["top_logprobs"]) == 2 for entry in content)


BAD_REQUESTS = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"model": "gpt-4", "prompt": "a"}, 404, "model"),
    ("/v1/completions", {"prompt": "a"}, 400, "model"),
    ("/v1/completions", {"model": "tiny-ja"}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny-ja", "prompt": "a", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny-ja", "prompt": "a", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny-ja", "prompt": "a " * 300}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny-ja", "prompt": "a", "max_tokens": 500}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny-ja", "prompt": "a", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": "tiny-ja", "prompt": "a", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": "tiny-ja", "prompt": "a", "n": 100}, 400, "n"),
    ("/v1/completions", {"model": "tiny-ja", "prompt": "a", "logprobs": 99}, 400, "logprobs"),
    ("/v1/completions", {"model": "tiny-ja", "prompt": "a", "stop": [1]}, 400, "stop"),
    ("/v1/completions", {"model": "tiny-ja", "prompt": "a", "echo": True}, 400, "echo"),
    ("/v1/completions", {"model": "tiny-ja", "prompt": [10**9]}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny-ja", "prompt": "a", "seed": -1}, 400, "seed"),
    ("/v1/chat/completions", {"model": "tiny-ja", "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny-ja", "messages": [{"content": "hi"}]}, 400, "messages[0]"),
    (
        "/v1/chat/completions",
        {"model": "tiny-ja", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
        400,
        "top_logprobs",
    ),
    (
        "/v1/chat/completions",
        {"model": "tiny-ja", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
        400,
        "tools",
    ),
    ("/api/attention", {"prompt": "a", "layer": 9}, 400, "layer"),
    ("/api/next", {"prompt": 3}, 400, "prompt"),
    ("/api/lens", {"prompt": "a " * 300}, 400, None),
]


@pytest.mark.parametrize("path, body, status, param", BAD_REQUESTS)
def test_bad_requests_get_an_openai_shaped_error(client, path, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post(path, content=content, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert "Traceback" not in response.text


def test_unknown_routes_and_methods_are_json_errors(client):
    for response, status in ((client.get("/v1/nothing"), 404), (client.get("/v1/completions"), 405)):
        assert response.status_code == status
        assert response.json()["error"]["message"]


def test_models_and_health(client):
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny-ja"]
    assert client.get("/health").json()["status"] == "ok"


def test_a_model_without_a_chat_template_gets_a_clear_400(tmp_path):
    folder = write_model_folder(tmp_path / "plain", chatml=False, train_steps=0)
    served = load_served(str(folder))
    assert served.template is None
    engine = Engine(served.model, served.tokenizer)
    try:
        with TestClient(create_app(served, engine), base_url="http://127.0.0.1") as client:
            body = {"model": "plain", "messages": [{"role": "user", "content": "hi"}]}
            response = client.post("/v1/chat/completions", json=body)
            assert response.status_code == 400
            assert "no chat template" in response.json()["error"]["message"]
            assert response.json()["error"]["code"] == "no_chat_template"
            assert client.post("/v1/completions", json={"model": "plain", "prompt": "hi", "max_tokens": 2}).is_success
    finally:
        engine.close()


# -------------------------------------------------------------------------------------------------
# The page's data
# -------------------------------------------------------------------------------------------------


def test_the_parameter_table_is_tegaki_params(client, served):
    info = client.get("/api/model").json()
    assert info["parameters"] == json.loads(json.dumps(count_parameters(served.model.config)))
    assert info["config"]["n_layer"] == 2 and info["chat_template"] == "tegaki's default (ChatML)"


def test_next_token_bars_follow_the_settings(client):
    plain = client.post("/api/next", json={"prompt": PROMPT, "temperature": 1.0}).json()
    hot = client.post("/api/next", json={"prompt": PROMPT, "temperature": 2.0}).json()
    top1 = client.post("/api/next", json={"prompt": PROMPT, "top_k": 1}).json()
    assert [t["prob"] for t in plain["tokens"]] == sorted((t["prob"] for t in plain["tokens"]), reverse=True)
    assert all(t["sample_prob"] == pytest.approx(t["prob"], rel=1e-4) for t in plain["tokens"])
    assert hot["tokens"][0]["sample_prob"] < plain["tokens"][0]["sample_prob"]  # hotter: flatter
    assert top1["candidates"] == 1 and top1["tokens"][0]["sample_prob"] == 1.0


def test_attention_endpoint_is_the_analysis_attention(client, served):
    data = client.post("/api/attention", json={"prompt": PROMPT, "layer": 1}).json()
    expected, tokens = attention_maps(served.model, served.tokenizer, PROMPT, 1)
    weights = torch.tensor(data["weights"])  # (H, T, T)
    assert data["tokens"] == tokens and weights.shape == expected.shape
    assert torch.allclose(weights, expected, atol=1e-4)
    assert torch.allclose(weights.sum(-1), torch.ones(weights.shape[:2]), atol=1e-3)
    assert float(weights.triu(diagonal=1).abs().max()) == 0.0  # no token reads a later one


def test_the_logit_lens_ends_in_the_model_prediction(client, served):
    data = client.post("/api/lens", json={"prompt": PROMPT, "top": 2}).json()
    ids = served.tokenizer.encode(PROMPT)
    assert len(data["layers"]) == 2 and len(data["layers"][-1]) == len(ids)
    with torch.no_grad():
        predicted = served.model(torch.tensor([ids]))[0].argmax(-1).tolist()  # (T,)
    assert [guesses[0]["id"] for guesses in data["layers"][-1]] == predicted


def test_the_trace_endpoint_is_tegaki_trace(client):
    data = client.post("/api/trace", json={"prompt": PROMPT, "layer": 1, "head": 2, "top_k": 3}).json()
    assert data["attention_pattern"]["layer"] == 1 and data["attention_pattern"]["head"] == 2
    assert len(data["next_tokens"]) == 3 and len(data["blocks"]) == 2


def test_the_page_and_its_files_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "tegaki" in page.text
    for name in ("app.js", "views.js", "i18n.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200
    assert "http" not in page.text.replace("http-equiv", "")  # nothing from elsewhere: no CDN
    assert '<link rel="icon" href="data:,">' in page.text  # no request for a missing /favicon.ico
    button_rule = client.get("/static/style.css").text.split("button {")[1].split("}")[0]
    assert "white-space: nowrap" in button_rule  # 停止 stays on one line in a narrow header


# -------------------------------------------------------------------------------------------------
# A real server process and the official client
# -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(folder):
    with running_server(folder) as url:
        yield url


@pytest.fixture(scope="module")
def openai_client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.mark.slow
def test_the_openai_client_end_to_end(openai_client):
    import openai

    assert [m.id for m in openai_client.models.list()] == ["tiny-ja"]
    out = openai_client.completions.create(model="tiny-ja", prompt=PROMPT, max_tokens=12, temperature=0)
    assert CONTINUATION.startswith(out.choices[0].text.rstrip("\ufffd")) and out.usage.completion_tokens == 12
    stream = openai_client.chat.completions.create(
        model="tiny-ja", messages=[{"role": "user", "content": "こんにちは"}], temperature=0, stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == "吾輩は猫である。" and all("\ufffd" not in p for p in pieces)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        openai_client.completions.create(model="tiny-ja", prompt="a", max_tokens=-5)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        openai_client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "a"}])


@pytest.mark.slow
def test_concurrent_requests_match_a_sequential_run(openai_client):
    """12 requests at once (sampled, seeded, Japanese and English) answer as they do one by one."""
    jobs = [
        {"prompt": p, "max_tokens": 10 + i, "temperature": 0.9, "seed": 100 + i}
        for i, p in enumerate([PROMPT, "名前", "The cat", "どこで生れた", "mat", "吾輩"] * 2)
    ]

    def ask(job):
        return openai_client.completions.create(model="tiny-ja", **job).choices[0].text

    sequential = [ask(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        concurrent = list(pool.map(ask, jobs))
    assert concurrent == sequential


@pytest.mark.slow
def test_a_load_of_32_requests_loses_and_mixes_nothing(openai_client):
    """32 streamed requests, 8 at a time: every one finishes, each with its own text."""
    jobs = [{"prompt": f"{i} {PROMPT}", "max_tokens": 8, "temperature": 0.7, "seed": i} for i in range(32)]

    def ask(job):
        stream = openai_client.completions.create(model="tiny-ja", stream=True, **job)
        chunks = list(stream)
        return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason

    expected = [openai_client.completions.create(model="tiny-ja", **job).choices[0].text for job in jobs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(ask, jobs))
    assert [text for text, _ in results] == expected
    assert all(reason in ("length", "stop") for _, reason in results)


@pytest.mark.slow
def test_a_client_that_disconnects_stops_its_generation(tmp_path):
    httpx = pytest.importorskip("httpx")
    folder = write_model_folder(tmp_path / "long", train_steps=0, block_size=4096)
    with running_server(folder) as url:
        # Greedy: this untrained model's greedy text never reaches an end token (sampled, it sometimes
        # did before the server saw the client go, and the request ended as finished, not cancelled).
        body = {"model": "long", "prompt": "a", "max_tokens": 4000, "stream": True, "temperature": 0}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            for _ in range(3):
                next(lines)
        for _ in range(100):  # bounded: at most 10 s
            state = health(url)
            if state["active"] == 0:
                break
            threading.Event().wait(0.1)
        assert state["active"] == 0 and state["cancelled"] == 1
        assert state["tokens"] < 4000  # it stopped long before the end

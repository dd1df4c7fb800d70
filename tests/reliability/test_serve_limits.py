"""`tegaki serve` left running on a laptop: a real server process on 127.0.0.1, real sockets, every
wait bounded. A client that hangs up stops its work; a huge request is refused without stalling
anyone; a short request is answered while a huge one decodes; only this server's own page (or an
--allow-origin one) and its own host names get answers; bad numbers are a 400, never a 500.
"""

from __future__ import annotations

import http.client
import json
import random
import select
import socket
import threading
import time
from urllib.parse import urlsplit

import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e '.[serve]'")

from serve_models import health, running_server, write_model_folder  # noqa: E402

pytestmark = pytest.mark.slow
KEY = "sk-tegaki-test"
GOOD_ORIGIN = "http://good.example:3000"


@pytest.fixture(scope="module")
def long_server(tmp_path_factory):
    """An untrained model with a long context (its greedy text never ends early), room for one
    request of 16 prompts x n=16, a small prompt limit and a body limit of 24 MiB."""
    folder = write_model_folder(tmp_path_factory.mktemp("serve-long") / "long", train_steps=0, block_size=4096)
    flags = ["--max-request-sequences", "256", "--max-queued", "300", "--max-prompt-tokens", "1000"]
    with running_server(folder, *flags, "--max-body-mb", "24") as url:
        yield url


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory):
    """A small context, an API key and one other origin allowed; the other limits at their defaults."""
    folder = write_model_folder(tmp_path_factory.mktemp("serve-guarded") / "small", train_steps=0, block_size=256)
    with running_server(folder, "--api-key", KEY, "--allow-origin", GOOD_ORIGIN) as url:
        yield url


def call(url: str, path: str, body=None, headers=None, method="POST", timeout=60):
    """(status, headers, parsed JSON or text) of one request; body: a dict (sent as JSON) or bytes."""
    address = urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=timeout)
    headers = dict(headers or {})
    if isinstance(body, dict):
        body = json.dumps(body, ensure_ascii=False).encode()
        headers.setdefault("Content-Type", "application/json")
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        raw = response.read()
    finally:
        connection.close()
    try:
        data = json.loads(raw)
    except ValueError:
        data = raw.decode(errors="replace")
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


def with_key(headers=None) -> dict:
    return {"Authorization": f"Bearer {KEY}", **(headers or {})}


def open_request(url: str, body: dict) -> socket.socket:
    """Send a POST and leave its socket open, unread: a client that may hang up later."""
    address = urlsplit(url)
    data = json.dumps(body).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {address.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    sock = socket.create_connection((address.hostname, address.port), timeout=10)
    sock.sendall(head.encode() + data)
    return sock


def send_in_pieces(url: str, head: str, pieces) -> int:
    """Send a request's head, then its body piece by piece, stopping as soon as the server answers
    (as a browser does when refused early); the status."""
    address = urlsplit(url)
    sock = socket.create_connection((address.hostname, address.port), timeout=60)
    try:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {address.netloc}\r\n{head}\r\n".encode())
        for piece in pieces:
            if select.select([sock], [], [], 0)[0]:  # an answer already
                break
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):  # refused and closed before the end
                break
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status
    finally:
        sock.close()


def wait_for(condition, timeout: float, what: str) -> dict:
    """Poll /health until condition(state) holds (bounded); the last state."""
    deadline = time.monotonic() + timeout
    while True:
        state = condition()
        if state:
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


def idle(url: str) -> dict:
    return wait_for(lambda: (s := health(url))["queued"] == 0 and s, 30, "the server going idle")


# -------------------------------------------------------------------------------------------------
# 1. A client that hangs up on a whole (not streamed) answer stops its work
# -------------------------------------------------------------------------------------------------


def test_a_client_that_hangs_up_on_a_whole_answer_stops_it(long_server):
    idle(long_server)
    before = health(long_server)
    body = {"model": "long", "prompt": "a", "n": 16, "max_tokens": 3000, "temperature": 0}
    sock = open_request(long_server, body)
    wait_for(lambda: health(long_server)["tokens"] - before["tokens"] > 50, 30, "the request starting")
    sock.close()  # the client goes away
    at_close = health(long_server)["tokens"]
    after = idle(long_server)
    # Every choice stops at its next turn: a round or two of 16 tokens, not the 48,000 asked for.
    assert after["tokens"] - at_close < 200, after["tokens"] - at_close
    assert after["cancelled"] - before["cancelled"] == 16


# -------------------------------------------------------------------------------------------------
# 2. Fair shares and a bound on queued work
# -------------------------------------------------------------------------------------------------


def test_a_short_request_is_answered_while_a_huge_one_decodes(long_server):
    idle(long_server)
    # 256 sequences of 2,000 tokens (greedy after "a", this model never ends early): minutes of work.
    big = {"model": "long", "prompt": ["a"] * 16, "n": 16, "max_tokens": 2000, "temperature": 0}
    sock = open_request(long_server, big)
    try:
        wait_for(lambda: health(long_server)["active"] >= 8, 30, "the huge request decoding")
        started = time.monotonic()
        status, _, out = call(long_server, "/v1/completions", {"model": "long", "prompt": "b", "max_tokens": 1})
        took = time.monotonic() - started
        assert status == 200, out
        assert out["usage"]["completion_tokens"] == 1
        assert took < 5, f"a 1-token request waited {took:.1f} s behind 256 sequences"
        # 256 of the 300 places are held: a request for 48 more is refused, and told when to come back.
        more = {"model": "long", "prompt": ["c", "d", "e"], "n": 16, "max_tokens": 1}
        status, headers, out = call(long_server, "/v1/completions", more)
        assert status == 429, out
        assert out["error"]["code"] == "server_busy" and int(headers["retry-after"]) >= 1
    finally:
        sock.close()
    after = idle(long_server)  # the huge request's client went away: all of it is dropped
    assert after["queued"] == 0


# -------------------------------------------------------------------------------------------------
# 3. Body size and prompt tokens; tokenizing never stalls the event loop
# -------------------------------------------------------------------------------------------------


def health_latencies(url: str, stop: threading.Event) -> list[float]:
    """Time /health again and again until stop is set."""
    times = []
    while not stop.is_set():
        started = time.monotonic()
        health(url)
        times.append(time.monotonic() - started)
        time.sleep(0.02)
    return times


def while_measuring_health(url: str, work):
    """(work's result, the slowest /health answer while it ran)."""
    stop = threading.Event()
    latencies: list[float] = []
    watcher = threading.Thread(target=lambda: latencies.extend(health_latencies(url, stop)))
    watcher.start()
    try:
        result = work()
    finally:
        stop.set()
        watcher.join(timeout=30)
    return result, max(latencies)


def test_a_50_mb_prompt_is_refused_and_health_stays_responsive(long_server):
    data = json.dumps({"model": "long", "prompt": "吾輩は猫である。" * (50 * 2**20 // 24)}).encode()  # 50 MB
    head = f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    pieces = (data[i : i + 2**20] for i in range(0, len(data), 2**20))
    status, slowest = while_measuring_health(long_server, lambda: send_in_pieces(long_server, head, pieces))
    assert status == 413
    assert slowest < 1.0, slowest


def test_a_body_without_a_length_is_counted_as_it_arrives(long_server):
    """Chunked: no Content-Length to refuse it by; the server counts and stops at 24 MiB."""
    first = b'{"model": "long", "prompt": "'
    pieces = [first, *(b"a" * 2**20 for _ in range(30))]
    chunked = (b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
    head = "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
    assert send_in_pieces(long_server, head, chunked) == 413


def test_a_long_prompt_never_stalls_the_event_loop(long_server):
    """20 MB of words seen once each (under the 24 MiB limit) would hold the tokenizer for seconds:
    parsed on a worker thread and refused by its length before tokenizing, /health answers throughout."""
    rng = random.Random(0)
    words = " ".join(str(rng.getrandbits(40)) for _ in range(20 * 2**20 // 18)).replace("1", "吾").replace("2", "輩")
    body = {"model": "long", "prompt": words, "max_tokens": 1}
    (status, _, out), slowest = while_measuring_health(long_server, lambda: call(long_server, "/v1/completions", body))
    assert status == 400 and out["error"]["code"] == "prompt_too_long", out
    assert "--max-prompt-tokens" in out["error"]["message"]
    assert slowest < 1.0, slowest


# -------------------------------------------------------------------------------------------------
# 4. Only its own page, its own host names, JSON bodies, and the key
# -------------------------------------------------------------------------------------------------

SMALL = {"model": "small", "prompt": "a", "max_tokens": 2}


def test_the_api_key_is_asked_for(guarded_server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        status, response_headers, out = call(guarded_server, "/v1/completions", SMALL, headers)
        assert status == 401 and out["error"]["code"] == "invalid_api_key", out
        assert response_headers["www-authenticate"] == "Bearer"
    assert call(guarded_server, "/v1/models", method="GET")[0] == 401
    assert call(guarded_server, "/v1/completions", SMALL, with_key())[0] == 200
    assert call(guarded_server, "/v1/models", headers=with_key(), method="GET")[0] == 200


def test_the_page_and_health_need_no_key(guarded_server):
    assert call(guarded_server, "/", method="GET")[0] == 200
    assert call(guarded_server, "/static/app.js", method="GET")[0] == 200
    assert call(guarded_server, "/health", method="GET")[0] == 200


@pytest.mark.parametrize(
    "content_type, body",
    [
        ("text/plain", json.dumps(SMALL).encode()),
        ("application/x-www-form-urlencoded", b"model=small&prompt=a"),
        ("multipart/form-data; boundary=x", b"--x--"),
        (None, json.dumps(SMALL).encode()),
    ],
)
def test_only_json_bodies_are_read(guarded_server, content_type, body):
    """The bodies any page may POST without asking the browser first are refused."""
    headers = with_key({"Content-Type": content_type} if content_type else {})
    status, _, out = call(guarded_server, "/v1/completions", body, headers)
    assert status == 415 and "application/json" in out["error"]["message"], out


def test_another_site_is_refused(guarded_server):
    """A page at evil.example posting to the server (CSRF), or reading it after rebinding its own
    name to 127.0.0.1 (then its Host is evil.example), gets no answer."""
    origin = {"Origin": "http://evil.example"}
    status, headers, out = call(guarded_server, "/v1/completions", SMALL, with_key(origin))
    assert status == 403 and out["error"]["code"] == "origin_not_allowed", out
    assert "access-control-allow-origin" not in headers
    rebound = {"Origin": "http://evil.example:8000", "Host": "evil.example:8000"}
    status, _, out = call(guarded_server, "/v1/completions", SMALL, with_key(rebound))
    assert status == 400 and out["error"]["code"] == "invalid_host", out
    status, _, out = call(guarded_server, "/health", headers={"Host": "evil.example"}, method="GET")
    assert status == 400, out


def test_its_own_page_and_allowed_origins_are_answered(guarded_server):
    own = urlsplit(guarded_server).netloc
    for host in (own, f"localhost:{urlsplit(guarded_server).port}"):
        headers = with_key({"Host": host, "Origin": f"http://{host}"})
        assert call(guarded_server, "/v1/completions", SMALL, headers)[0] == 200
    status, headers, _ = call(guarded_server, "/v1/completions", SMALL, with_key({"Origin": GOOD_ORIGIN}))
    assert status == 200 and headers["access-control-allow-origin"] == GOOD_ORIGIN
    preflight = {"Origin": GOOD_ORIGIN, "Access-Control-Request-Method": "POST"}
    status, headers, _ = call(guarded_server, "/v1/completions", headers=preflight, method="OPTIONS")
    assert status == 204 and "Authorization" in headers["access-control-allow-headers"]


# -------------------------------------------------------------------------------------------------
# 5, 6. Numbers that once ended in a 500
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"temperature": 1e-300}, "temperature"),
        ({"repetition_penalty": 1e-308}, "repetition_penalty"),
        ({"presence_penalty": 1e300}, "presence_penalty"),
    ],
)
def test_sampling_settings_that_would_give_nan_are_a_400(guarded_server, extra, param):
    status, _, out = call(guarded_server, "/v1/completions", {**SMALL, **extra}, with_key())
    assert status == 400 and out["error"]["param"] == param, out


def test_a_tiny_top_p_samples_the_best_token(guarded_server):
    body = {**SMALL, "top_p": 1e-300, "max_tokens": 4}
    sampled = call(guarded_server, "/v1/completions", body, with_key())
    greedy = call(guarded_server, "/v1/completions", {**body, "temperature": 0, "top_p": None}, with_key())
    assert sampled[0] == 200 and sampled[2]["choices"][0]["text"] == greedy[2]["choices"][0]["text"]


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"model": "small", "prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}",
        b'{"model": "small", "prompt": "a", "max_tokens": ' + b"9" * 4000 + b"}",
    ],
)
def test_absurd_json_is_a_400(guarded_server, raw):
    status, _, out = call(guarded_server, "/v1/completions", raw, with_key({"Content-Type": "application/json"}))
    assert status == 400 and out["error"]["message"], out


def test_a_chat_message_longer_than_the_context_is_context_length_exceeded(guarded_server):
    body = {"model": "small", "messages": [{"role": "user", "content": "a " * 400}]}  # over 256 tokens
    status, _, out = call(guarded_server, "/v1/chat/completions", body, with_key())
    assert status == 400 and out["error"]["code"] == "context_length_exceeded", out
    assert out["error"]["param"] == "messages"


def test_the_page_refuses_a_text_too_long_before_tokenizing(guarded_server):
    body = {"prompt": "吾輩は猫である。" * 500_000}  # 4 million characters, 12 MB: over 4 MiB
    assert call(guarded_server, "/api/next", body, with_key())[0] == 413
    status, _, out = call(guarded_server, "/api/lens", {"prompt": "猫" * 1_000_000}, with_key())
    assert status == 400 and out["error"]["code"] == "context_length_exceeded", out


def test_a_request_over_the_sequence_limit_is_refused(guarded_server):
    body = {**SMALL, "prompt": ["a"] * 16, "n": 16}  # 256 sequences; 64 by default
    status, _, out = call(guarded_server, "/v1/completions", body, with_key())
    assert status == 400 and out["error"]["code"] == "too_many_sequences", out
    assert "--max-request-sequences" in out["error"]["message"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-queued", "0"], "--max-queued must be > 0"),
        (["--max-body-mb", "-1"], "--max-body-mb must be > 0"),
        (["--allow-origin", "good.example/page"], "--allow-origin takes an origin"),
        (["--max-request-sequences", "20", "--max-queued", "10"], "could never be taken"),
    ],
)
def test_bad_limit_flags_are_one_line(flags, message):
    from reliability_helpers import cli

    rc, err = cli(["serve", "--model", "no-such-model", *flags])
    assert rc == 2 and message in err and "Traceback" not in err

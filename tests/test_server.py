"""The scheduling engine and `edgeloop serve`: concurrency, streaming, the OpenAI client, errors, cancellation,
the queue limit, draining on SIGTERM, and depth-wise == sequence-level scheduling."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

import edgeloop
from edgeloop.runtimes.engine import Engine, QueueFull

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def artifact(converted, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "tiny"
    edgeloop.compile(converted("llama", loops=4, lora_rank=4), out)
    return out


@pytest.fixture(scope="module")
def model(artifact):
    return edgeloop.load(artifact)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(artifact, *flags: str, **popen) -> tuple[subprocess.Popen, str]:
    """`edgeloop serve ARTIFACT FLAGS` on a free port, once /health answers 200 (or fail with its stderr)."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edgeloop", "serve", str(artifact), "--port", str(port), *flags],
                            stderr=subprocess.PIPE, **popen)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    pytest.fail(proc.stderr.read().decode()[-2000:])


@pytest.fixture(scope="module")
def server(artifact):
    proc, url = _start_server(artifact, "--max-rows", "4", "--max-queue", "32", stdout=subprocess.PIPE)
    yield url, proc
    if proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=60)


PROMPTS = ["In the beginning", "and the", "x", "the quick brown fox jumps over", "God said", "a b c d e f"]


def test_engine_schedulers_agree_and_match_alone(model):
    for policy in ("none", "depth:2", "agreement:1"):
        options = dict(max_new_tokens=10, ignore_eos=True, exit=policy)
        alone = [model.generate(p, **options) for p in PROMPTS]
        for scheduler in ("depth", "sequence"):
            config = model.generation_config(**options)
            requests = [model._request(p, config) for p in PROMPTS]
            engine = Engine(model, max_rows=3, scheduler=scheduler)  # fewer rows than requests: admission
            for r in requests:
                engine.submit(r)
            engine.run_until_idle()
            assert [r.text for r in requests] == alone, (policy, scheduler)
            status = engine.status()
            assert status["finished"] == len(PROMPTS) and status["active_rows"] == 0 and status["queue_depth"] == 0


@pytest.mark.parametrize("scheduler", ["depth", "sequence"])
def test_engine_admits_prompts_among_decoding_rows(model, scheduler):
    """Requests of different lengths: a new prompt joins rows that are mid-decode, and every request
    still equals its run alone."""
    lengths = [3, 9, 5, 12, 4, 7]
    options = [dict(max_new_tokens=n, ignore_eos=True, exit="agreement:1") for n in lengths]
    alone = [model.generate(p, **o) for p, o in zip(PROMPTS, options)]
    requests = [model._request(p, model.generation_config(**o)) for p, o in zip(PROMPTS, options)]
    engine = Engine(model, max_rows=3, scheduler=scheduler)
    for r in requests:
        engine.submit(r)
    engine.run_until_idle()
    assert [r.text for r in requests] == alone
    assert engine.status()["finished"] == len(PROMPTS)


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(model, monkeypatch):
    """A step that raises ends the requests in it with "error" and frees their rows; later requests
    run; after repeated failures the engine stops and refuses work instead of leaving it waiting."""
    from edgeloop.runtimes import engine as engine_mod

    config = model.generation_config(max_new_tokens=4, ignore_eos=True)
    engine = Engine(model, max_rows=2)
    original, fail = engine.step, {"n": 1}

    def flaky():
        if fail["n"] > 0 and (engine.queue or engine.active):
            fail["n"] -= 1
            with engine._lock:
                engine._admit()  # the requests hold rows when the step fails
            raise RuntimeError("injected")
        return original()

    monkeypatch.setattr(engine, "step", flaky)
    engine.start()
    try:
        first = [engine.submit(model._request(p, config)) for p in PROMPTS[:2]]
        for job in first:
            assert job.done.wait(60)
        later = engine.submit(model._request(PROMPTS[2], config))
        assert later.done.wait(60)
        assert later.request.stats.finish_reason != "error" and later.request.text == model.generate(
            PROMPTS[2], max_new_tokens=4, ignore_eos=True)
        status = engine.status()
        assert status["failed_steps"] == 1 and status["active_rows"] == 0
        assert status["failed"] == sum(j.request.stats.finish_reason == "error" for j in first) >= 1
        fail["n"] = engine_mod.MAX_FAILED_STEPS  # now every step fails: the engine stops
        for p in PROMPTS[3:3 + engine_mod.MAX_FAILED_STEPS]:
            doomed = engine.submit(model._request(p, config))
            assert doomed.done.wait(60) and doomed.request.stats.finish_reason == "error"
        engine._thread.join(60)
        assert engine.error is not None
        with pytest.raises(engine_mod.EngineFailed):
            engine.submit(model._request(PROMPTS[0], config))
    finally:
        engine.stop(drain=False, timeout=10)


def test_engine_queue_limit_and_cancel(model):
    config = model.generation_config(max_new_tokens=50, ignore_eos=True)
    engine = Engine(model, max_rows=1, max_queue=2)
    jobs = [engine.submit(model._request(p, config)) for p in PROMPTS[:2]]
    with pytest.raises(QueueFull):
        engine.submit(model._request(PROMPTS[2], config))
    engine.step()  # the first job is admitted
    engine.cancel(jobs[1])  # waiting: gone at once
    engine.cancel(jobs[0])  # running: its row is freed at the next step
    engine.run_until_idle()
    status = engine.status()
    assert status["cancelled"] == 2 and status["active_rows"] == 0 and status["queue_depth"] == 0
    assert jobs[0].done.is_set() and jobs[1].done.is_set()


def test_openai_client_streaming_and_chat(server, model):
    from openai import OpenAI

    url, _ = server
    client = OpenAI(base_url=url + "/v1", api_key="none")
    name = client.models.list().data[0].id
    full = client.completions.create(model=name, prompt="In the beginning", max_tokens=12, temperature=0)
    assert full.choices[0].text == model.generate("In the beginning", max_new_tokens=12)
    assert full.usage.completion_tokens == len(model.last_stats.depths)
    pieces = client.completions.create(model=name, prompt="In the beginning", max_tokens=12, temperature=0,
                                       stream=True)
    assert "".join(c.choices[0].text for c in pieces) == full.choices[0].text
    messages = [{"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=0)
    streamed = client.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content
    prompt = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert chat.choices[0].message.content == model.generate(prompt, max_new_tokens=8)


def test_concurrent_requests_equal_alone(server, model):
    url, _ = server
    alone = {p: model.generate(p, max_new_tokens=10, exit="agreement:1") for p in PROMPTS}
    results, errors = {}, []

    def client(prompts):
        for p in prompts:
            try:
                r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": p, "max_tokens": 10,
                                                               "exit": "agreement:1"}, timeout=120)
                results.setdefault(p, []).append(r.json()["choices"][0]["text"])
            except Exception as e:  # noqa: BLE001
                errors.append(e)

    plan = [PROMPTS[i % len(PROMPTS)::4][:4] or PROMPTS[:4] for i in range(4)]  # 16 requests over 4 clients
    threads = [threading.Thread(target=client, args=(p,)) for p in plan]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sum(len(v) for v in results.values()) == sum(len(p) for p in plan)
    for p, texts in results.items():
        assert all(t == alone[p] for t in texts), p


@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "not valid JSON"),
    ({"model": "other", "prompt": "hi"}, 400, "not served here"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x" * 700}, 400, "context"),
    ({"model": "tiny", "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny", "prompt": "hi", "exit": "sometimes"}, 400, "exit policy"),
    ({"model": "tiny"}, 400, "prompt"),
])
def test_bad_requests_get_400_and_the_server_keeps_serving(server, body, status, needle):
    url, _ = server
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(url + "/v1/completions", timeout=60, **kw)
    assert r.status_code == status and needle in r.json()["error"]["message"], r.text
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "ok", "max_tokens": 2}).status_code == 200


def test_disconnect_cancels_and_frees_the_slot(server):
    url, _ = server
    with httpx.stream("POST", url + "/v1/completions", json={"model": "tiny", "prompt": "go", "max_tokens": 400,
                                                             "stream": True, "ignore": 1}, timeout=60) as r:
        for _ in r.iter_lines():
            break  # the first chunk arrived; hang up
    for _ in range(100):
        m = httpx.get(url + "/metrics").json()
        if m["active_rows"] == 0 and m["queue_depth"] == 0:
            break
        time.sleep(0.1)
    assert m["active_rows"] == 0 and m["queue_depth"] == 0 and m["cancelled"] >= 1
    assert set(m) >= {"mean_rows_per_block_call", "tokens_per_s", "exit_depth_histogram", "queue_depth"}


def test_queue_full_gives_429(artifact):
    proc, url = _start_server(artifact, "--max-rows", "1", "--max-queue", "1")
    try:
        codes = []

        def send():
            codes.append(httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 200,
                                                                   "ignore_eos": True}, timeout=120).status_code)

        threads = [threading.Thread(target=send) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert 429 in codes and 200 in codes
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_sigterm_drains(artifact):
    proc, url = _start_server(artifact)
    result = {}

    def send():
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "drain", "max_tokens": 60},
                       timeout=120)
        result["status"], result["text"] = r.status_code, r.json()["choices"][0]["text"]

    t = threading.Thread(target=send)
    t.start()
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    t.join(timeout=120)
    # uvicorn finishes in-flight requests, runs the lifespan shutdown (the engine drains) and then
    # re-raises the signal, so a supervisor sees the usual SIGTERM exit status
    assert proc.wait(timeout=120) in (0, -signal.SIGTERM)
    assert b"Traceback" not in proc.stderr.read()
    assert result.get("status") == 200 and result["text"]


def test_binds_localhost_by_default():
    import inspect

    from edgeloop.runtimes import server

    assert inspect.signature(server.serve).parameters["host"].default == "127.0.0.1"


def test_server_reports_a_failing_step_and_keeps_serving(artifact):
    """A request whose engine step fails gets 500 (an error object when streaming); the next request is
    served; once the engine stopped, requests get 503 and /health says so."""
    from fastapi.testclient import TestClient

    from edgeloop.runtimes import engine as engine_mod
    from edgeloop.runtimes.server import create_app

    model = edgeloop.load(artifact)
    engine = Engine(model, max_rows=2)
    fail = {"n": 0}
    original = model.backend.step

    def step(rows):
        if fail["n"] > 0:
            fail["n"] -= 1
            raise RuntimeError("injected backend failure")
        return original(rows)

    model.backend.step = step
    engine.start()
    body = {"model": artifact.name, "prompt": "In the beginning", "max_tokens": 4}
    with TestClient(create_app(model, engine, artifact.name)) as client:
        fail["n"] = 1
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 500 and "injected backend failure" in r.json()["error"]["message"]
        fail["n"] = 1
        with client.stream("POST", "/v1/completions", json=dict(body, stream=True)) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert '"error"' in lines[-2] and "injected" in lines[-2] and lines[-1] == "data: [DONE]"
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        fail["n"] = 10 ** 6
        for _ in range(engine_mod.MAX_FAILED_STEPS):
            client.post("/v1/completions", json=body)
        engine._thread.join(60)
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 503 and "restart" in r.json()["error"]["message"]
        assert client.get("/health").status_code == 503

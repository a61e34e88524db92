"""The official `openai` client against `tilefuse serve` (run by tests/cli_serve.rs).

Checks, in order: the model list and health; a completion; a streamed
completion whose deltas add up to the same text and to `tilefuse generate`'s
greedy output; stop strings; seeded sampling; a chat completion, streamed and
not; every bad request gets its 4xx with an OpenAI error body while the
server keeps answering; a client that disconnects mid-stream is cancelled; a
bounded load test (16 clients x 4 requests) where every request is answered
exactly once and correctly and 429s come only when the queue is full; the
metrics parse and add up; SIGTERM with a request in flight finishes it.

Usage: serve_client.py --base-url URL --tilefuse BIN --queue N --pid PID
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time

import urllib.error
import urllib.request

import openai

PROMPT = "def fibonacci(n):"
LOAD_PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:\n", "def parse(text):"]


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def http(url, body=None):
    """(status, text) of a GET, or of a POST of `body` (bytes), through the standard library."""
    req = urllib.request.Request(url, data=body, method="GET" if body is None else "POST",
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metrics(base):
    """Prometheus text -> {(name, frozenset(labels)): value}; every sample line must parse."""
    status, text = http(base + "/metrics")
    check(status == 200, f"/metrics answered {status}")
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, value = line.rsplit(" ", 1)
        labels = {}
        if "{" in head:
            name, rest = head.split("{", 1)
            check(rest.endswith("}"), f"bad metrics line {line!r}")
            for pair in rest[:-1].split(","):
                k, v = pair.split("=", 1)
                check(v.startswith('"') and v.endswith('"'), f"bad label in {line!r}")
                labels[k] = v[1:-1]
        else:
            name = head
        out[(name, frozenset(labels.items()))] = float(value)
    return out


def metric(m, name, **labels):
    return m.get((name, frozenset(labels.items())), 0.0)


def requests_total(m, outcome):
    return sum(
        v for (n, ls), v in m.items()
        if n == "tilefuse_requests_total" and ("outcome", outcome) in ls
    )


def alive(base):
    status, text = http(base + "/health")
    check(status == 200, f"/health answered {status} {text}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--tilefuse", required=True)
    ap.add_argument("--queue", type=int, required=True)
    ap.add_argument("--pid", type=int, required=True)
    a = ap.parse_args()
    base = a.base_url
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=300)

    # Models and health.
    models = [m.id for m in client.models.list()]
    check(models == ["mimo-v2-code"], f"models: {models}")
    model = models[0]
    alive(base)

    # A completion, the same streamed, and tilefuse generate's greedy text.
    c = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    text = c.choices[0].text
    check(c.choices[0].finish_reason in ("length", "stop"), f"finish: {c}")
    check(c.usage.completion_tokens >= 1 and c.usage.prompt_tokens >= 1, f"usage: {c.usage}")
    check(len(text) > 0, "empty completion")
    deltas = []
    finish = None
    for chunk in client.completions.create(
        model=model, prompt=PROMPT, max_tokens=12, temperature=0, stream=True
    ):
        deltas.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    check(len([d for d in deltas if d]) >= 2, f"the stream came in one piece: {deltas}")
    check("".join(deltas) == text, f"stream {''.join(deltas)!r} != completion {text!r}")
    check(finish == c.choices[0].finish_reason, f"stream finish {finish}")
    gen = subprocess.run(
        [a.tilefuse, "generate", "--prompt", PROMPT, "--max-tokens", "12", "--json"],
        capture_output=True, text=True, check=True, timeout=600,
    )
    gen_text = json.loads(gen.stdout.strip().splitlines()[-1])["text"]
    check(gen_text == text, f"generate {gen_text!r} != serve {text!r}")
    print(f"completion ok: {text!r}")

    # Stop strings cut the text before them.
    cut = text[3:6]
    s = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0, stop=[cut])
    check(s.choices[0].text == text[: text.index(cut)], f"stop {cut!r}: {s.choices[0].text!r}")
    check(s.choices[0].finish_reason == "stop", f"stop finish: {s.choices[0].finish_reason}")

    # A seed reproduces a sampled completion.
    r1, r2 = (
        client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0.9, seed=7)
        .choices[0].text
        for _ in range(2)
    )
    check(r1 == r2, f"seed 7 gave {r1!r} then {r2!r}")

    # Chat, from the checkpoint's template; streamed deltas add up to it.
    msgs = [{"role": "system", "content": "You write Python."},
            {"role": "user", "content": "Write a function that adds two numbers."}]
    ch = client.chat.completions.create(model=model, messages=msgs, max_tokens=10, temperature=0)
    reply = ch.choices[0].message
    check(reply.role == "assistant" and isinstance(reply.content, str) and reply.content,
          f"chat: {ch}")
    parts = [
        k.choices[0].delta.content or ""
        for k in client.chat.completions.create(
            model=model, messages=msgs, max_tokens=10, temperature=0, stream=True
        )
        if k.choices
    ]
    check("".join(parts) == reply.content, f"chat stream {''.join(parts)!r} != {reply.content!r}")
    print(f"chat ok: {reply.content!r}")

    # Bad requests: each its 4xx with an OpenAI error body; the server lives on.
    long_prompt = "def f(x):\n    return x + 1\n" * 400
    raw = [
        ("malformed JSON", "/v1/completions", b'{"prompt": "x", ', 400),
        ("empty body", "/v1/completions", b"", 400),
        ("not an object", "/v1/completions", b"[1, 2]", 400),
        ("prompt of the wrong type", "/v1/completions", {"prompt": 5}, 400),
        ("missing prompt", "/v1/completions", {"max_tokens": 3}, 400),
        ("empty prompt", "/v1/completions", {"prompt": ""}, 400),
        ("two prompts", "/v1/completions", {"prompt": ["a", "b"]}, 400),
        ("token id past the vocabulary", "/v1/completions", {"prompt": [1, 999999]}, 400),
        ("prompt past the context", "/v1/completions", {"prompt": long_prompt}, 400),
        ("max_tokens 0", "/v1/completions", {"prompt": "x", "max_tokens": 0}, 400),
        ("max_tokens absurd", "/v1/completions", {"prompt": "x", "max_tokens": 10**15}, 400),
        ("max_tokens past the context", "/v1/completions", {"prompt": "x", "max_tokens": 100000}, 400),
        ("max_tokens a string", "/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400),
        ("max_tokens fractional", "/v1/completions", {"prompt": "x", "max_tokens": 2.5}, 400),
        ("temperature negative", "/v1/completions", {"prompt": "x", "temperature": -1}, 400),
        ("temperature a string", "/v1/completions", {"prompt": "x", "temperature": "hot"}, 400),
        ("n = 2", "/v1/completions", {"prompt": "x", "n": 2}, 400),
        ("seed negative", "/v1/completions", {"prompt": "x", "seed": -1}, 400),
        ("stop of the wrong type", "/v1/completions", {"prompt": "x", "stop": 3}, 400),
        ("empty stop string", "/v1/completions", {"prompt": "x", "stop": [""]}, 400),
        ("stream not a boolean", "/v1/completions", {"prompt": "x", "stream": "yes"}, 400),
        ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "x"}, 404),
        ("no messages", "/v1/chat/completions", {"messages": []}, 400),
        ("messages a string", "/v1/chat/completions", {"messages": "hi"}, 400),
        ("message without role", "/v1/chat/completions", {"messages": [{"content": "x"}]}, 400),
        ("chat past the context", "/v1/chat/completions",
         {"messages": [{"role": "user", "content": long_prompt}]}, 400),
    ]
    for what, path, body, status in raw:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        got, answer = http(base + path, content)
        check(got == status, f"{what}: expected {status}, got {got} {answer}")
        err = json.loads(answer).get("error", {})
        check(isinstance(err.get("message"), str) and err["message"] and "type" in err,
              f"{what}: not an OpenAI error body: {answer}")
        alive(base)
    # The same through the client: it raises the matching exceptions.
    for kwargs, exc in [
        (dict(prompt="", max_tokens=4), openai.BadRequestError),
        (dict(prompt="x", max_tokens=0), openai.BadRequestError),
        (dict(prompt="x", n=3), openai.BadRequestError),
    ]:
        try:
            client.completions.create(model=model, **kwargs)
        except exc:
            pass
        else:
            raise AssertionError(f"{kwargs} was accepted")
    # Unknown fields are ignored (and logged).
    u = client.completions.create(model=model, prompt=PROMPT, max_tokens=2, temperature=0,
                                  extra_body={"top_k": 3, "not_a_field": [1]})
    check(u.choices[0].text == text[: len(u.choices[0].text)], f"ignored fields: {u}")
    print(f"{len(raw) + 3} bad requests refused, server alive")

    # A client that goes away mid-stream frees the model at the next step.
    before = metrics(base)
    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=400,
                                       temperature=0, stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.time() + 120
    while True:
        m = metrics(base)
        if requests_total(m, "cancelled") > requests_total(before, "cancelled"):
            break
        check(time.time() < deadline, "the disconnected stream was never cancelled")
        time.sleep(0.2)
    made = metric(m, "tilefuse_generation_tokens_total") - metric(before, "tilefuse_generation_tokens_total")
    check(made < 400, f"the cancelled request ran to the end ({made} tokens)")
    alive(base)
    # One that gives up while queued leaves the queue at the next decode step,
    # while the request ahead of it still runs.
    before = metrics(base)
    ahead = client.completions.create(model=model, prompt=PROMPT, max_tokens=2000,
                                      temperature=0, stream=True)
    first = next(iter(ahead))
    impatient = client.with_options(timeout=0.3)
    try:
        impatient.completions.create(model=model, prompt=PROMPT, max_tokens=4)
    except openai.APITimeoutError:
        pass
    else:
        raise AssertionError("the queued request was answered while another decoded")
    deadline = time.time() + 60
    while True:
        m = metrics(base)
        if (requests_total(m, "cancelled") > requests_total(before, "cancelled")
                and metric(m, "tilefuse_queue_depth") == 0):
            break
        check(time.time() < deadline, "the queued request that gave up kept its place")
        time.sleep(0.1)
    check(metric(m, "tilefuse_requests_running") == 1, "the request ahead stopped too")
    ahead.close()
    print(f"disconnect ok: cancelled after {made:.0f} tokens; a queued one left the queue "
          f"while {first.choices[0].text!r}... decoded")

    # Load: 16 clients x 4 requests; each answered once, correctly; 429 only
    # when the queue holds --queue requests (all sent, none answered yet).
    expected = {
        p: client.completions.create(model=model, prompt=p, max_tokens=4, temperature=0).choices[0].text
        for p in LOAD_PROMPTS
    }
    before = metrics(base)
    lock = threading.Lock()
    state = {"outstanding": 0, "429": 0, "ok": 0}
    failures = []
    answers = {}

    def one(client_id, k):
        prompt = LOAD_PROMPTS[(client_id + k) % len(LOAD_PROMPTS)]
        while True:
            with lock:
                state["outstanding"] += 1
            try:
                c = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0)
            except openai.RateLimitError as e:
                with lock:
                    others = state["outstanding"] - 1
                    state["outstanding"] -= 1
                    state["429"] += 1
                if others < a.queue:
                    failures.append(f"429 with only {others} other requests outstanding")
                retry = e.response.headers.get("retry-after")
                if retry is None or not retry.isdigit():
                    failures.append(f"429 without a Retry-After: {e.response.headers}")
                time.sleep(min(float(retry or 1), 1.0))
                continue
            with lock:
                state["outstanding"] -= 1
                state["ok"] += 1
                key = (client_id, k)
                if key in answers:
                    failures.append(f"{key} answered twice")
                answers[key] = c.choices[0].text
            if c.choices[0].text != expected[prompt]:
                failures.append(f"{prompt!r}: {c.choices[0].text!r} != {expected[prompt]!r}")
            return

    def worker(client_id):
        try:
            for k in range(4):
                one(client_id, k)
        except Exception as e:  # noqa: BLE001 - every failure is reported below
            failures.append(f"client {client_id}: {type(e).__name__}: {e}")

    t0 = time.time()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    check(not failures, "load test:\n" + "\n".join(failures[:20]))
    check(len(answers) == 64 and state["ok"] == 64, f"answered {len(answers)} of 64")
    after = metrics(base)
    served = requests_total(after, "ok") - requests_total(before, "ok")
    refused = requests_total(after, "queue_full") - requests_total(before, "queue_full")
    check(served == 64, f"metrics count {served} ok requests, clients 64")
    check(refused == state["429"], f"metrics count {refused} 429s, clients {state['429']}")
    check(metric(after, "tilefuse_queue_depth") == 0, "the queue is not empty after the load")
    print(f"load ok: 64 answered in {time.time() - t0:.1f} s, {state['429']} 429s")

    # The metrics: histograms consistent, τ and acceptance per position present.
    m = metrics(base)
    for h in ("tilefuse_time_to_first_token_seconds", "tilefuse_decode_tokens_per_second"):
        check(metric(m, h + "_count") > 0, f"{h} is empty")
        check(metric(m, h + "_bucket", le="+Inf") == metric(m, h + "_count"), f"{h} buckets")
    check(metric(m, "tilefuse_spec_tau") >= 1.0, "no tau")
    check(metric(m, "tilefuse_spec_acceptance_rate", position="1") > 0, "no acceptance at position 1")
    check(metric(m, "tilefuse_prompt_tokens_total") > 0, "no prompt tokens")
    check(metric(m, "tilefuse_generation_tokens_total") > 0, "no generated tokens")
    check(metric(m, "tilefuse_queue_capacity") == a.queue, "queue capacity")
    check(any(n == "tilefuse_forward_seconds_count" for n, _ in m), "no forward times")
    check(requests_total(m, "invalid") >= len(raw) - 1, "the refusals are not counted")
    print(f"metrics ok: tau {metric(m, 'tilefuse_spec_tau'):.2f}")

    # SIGTERM with a request in flight: it finishes, then the server exits 0
    # (the Rust side checks the exit).
    got = []
    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=24,
                                       temperature=0, stream=True)
    for i, chunk in enumerate(stream):
        if i == 0:
            os.kill(a.pid, signal.SIGTERM)
        got.append(chunk)
    check(got[-1].choices[0].finish_reason == "length",
          f"the in-flight request did not finish: {got[-1]}")
    print("shutdown ok: the in-flight stream finished")
    print("serve_client: all checks passed")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"serve_client: FAILED: {e}", file=sys.stderr)
        sys.exit(1)

#!/usr/bin/env bash
# On a GPU machine: streamed decoding speed through `tilefuse serve` against
# `tilefuse generate` on the same prompt, the same card and the same
# settings (the shipped pair with its drafter, greedy, graph mode). Both
# count the tokens committed after the first one over the time after the
# first one: generate's "tokens/s after prefill", and for the server the
# completion tokens after the first streamed delta (which carries the
# prefill's one token) over the time from that delta to the last. Each side
# runs REPS times (default 5); medians, and the ratio, printed last.
# Exits non-zero when a run fails or the streamed text differs from
# generate's.
# Usage: bash tools/gpu_serve.sh   (binary: ${TILEFUSE_BIN_DIR:-gpu-bin}/tilefuse)
set -u
# TILEFUSE_REQUIRE_GPU=1: a missing GPU fails instead of falling back.
export TILEFUSE_REQUIRE_GPU=1
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export TILEFUSE_CACHE_DIR=${TILEFUSE_CACHE_DIR:-/tmp/tilefuse-cache}
bin=${TILEFUSE_BIN_DIR:-gpu-bin}/tilefuse
out=${OUT:-/tmp}
reps=${REPS:-5}
tokens=${TOKENS:-256}
port=${PORT:-8123}
backend=${BACKEND:-cuda}
prompt='def parse_config(path):'
pair=models/mimo-v2-code
: >"$out/generate.jsonl"
for _ in $(seq "$reps"); do
    "$bin" generate --model "$pair/target" --draft "$pair/drafter" --prompt "$prompt" \
        --max-tokens "$tokens" --backend "$backend" --mode graph --json >>"$out/generate.jsonl" 2>>"$out/generate.err" ||
        { echo "generate failed"; tail -5 "$out/generate.err"; exit 1; }
done
"$bin" serve --model "$pair/target" --draft "$pair/drafter" --backend "$backend" --mode graph \
    --port "$port" >"$out/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null' EXIT
python3 - "$port" "$prompt" "$tokens" "$reps" "$out/generate.jsonl" <<'PY'
import http.client, json, statistics, sys, time
port, prompt, tokens, reps, gen_path = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
for _ in range(600):
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        c.request("GET", "/health")
        if c.getresponse().status == 200:
            break
    except OSError:
        pass
    time.sleep(0.5)
else:
    sys.exit("the server did not come up")
gen = [json.loads(l) for l in open(gen_path) if l.strip()]

def streamed():
    body = json.dumps({"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200, (r.status, r.read())
    text, times, usage = "", [], None
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            usage = chunk["usage"]
        for ch in chunk.get("choices", []):
            if ch.get("text"):
                text += ch["text"]
                times.append(time.perf_counter())
    n = usage["completion_tokens"]
    return text, n, (n - 1) / (times[-1] - times[0]), times[0] - t0

runs = [streamed() for _ in range(reps)]
gen_text = gen[0]["text"]
same = all(r[0] == gen_text for r in runs)
g = statistics.median(x["tokens_per_s"] for x in gen)
s = statistics.median(r[2] for r in runs)
gen_all = ", ".join("%.0f" % x["tokens_per_s"] for x in gen)
plain = statistics.median(x["plain_tokens_per_s"] for x in gen)
print(f"generate (speculative, {len(gen[0]['generated_ids'])} tokens): {gen_all} tokens/s after prefill; plain {plain:.0f}")
srv_all = ", ".join("%.0f" % r[2] for r in runs)
ttft = statistics.median(r[3] for r in runs) * 1e3
print(f"serve (streamed, {runs[0][1]} tokens): {srv_all} tokens/s after the first delta; first delta after {ttft:.1f} ms")
print(f"streamed text equals generate's: {same}")
print(f"median: generate {g:.0f} tokens/s, serve {s:.0f} tokens/s, serve/generate = {s / g:.3f}")
sys.exit(0 if same else 1)
PY

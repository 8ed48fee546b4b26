"""A small OpenAI-compatible chat client that returns JSON items validated by a pydantic schema.

Works against OpenAI or any server speaking its chat API (vLLM, Ollama, llama.cpp, LM Studio).
Retries on 429/5xx/connection errors are the openai client's own (`llm.max_retries`, honouring the
server's retry-after); this module adds what the client does not do:

- structured outputs: every request carries the reply's JSON schema in the server's dialect
  (`llm.structured`; `auto` tries OpenAI's `json_schema` first and falls back once per endpoint on a
  400/422 that names `response_format`: llama-cpp-python's `json_object` + `schema`, then plain
  `json_object`, then nothing), remembered for the client's life and reported in `stats`;
- `llm.max_tokens` on every request; a reply cut there (`finish_reason == "length"`) is re-asked, and
  named as such if it never fits;
- lenient JSON parsing (code fences, prose around the object) and re-asking when a reply is not JSON;
- per-item validation: a malformed item is dropped with a recorded reason, the rest are kept;
- a disk cache keyed by the request, so a rerun reads its answers instead of calling the server;
- errors as one-line LivoErrors that name the endpoint and model.

The API key is read from the environment variable named by `llm.api_key_env` and is only ever handed
to the openai client: it is not part of the cache key, the cache files, or any error message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import openai
from pydantic import BaseModel, ValidationError

from livo_core.config import LLMConfig
from livo_core.errors import LivoError
from livo_core.faults import kill_point
from livo_core.files import atomic_write_text
from livo_core.paths import PROMPTS_DIR, prompt_template

log = logging.getLogger(__name__)

OPENAI_BASE_URL = "https://api.openai.com/v1"
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}
SYSTEM_PROMPT = "You write data for machine-learning experiments. Reply with one JSON object and nothing else."
# What `auto` tries, in order: OpenAI / vLLM / llama-server / LM Studio / SGLang / Ollama, then llama-cpp-python.
DIALECTS = ("json_schema", "json_object_schema", "json_object", "none")


def response_format(dialect: str, schema: dict) -> dict | None:
    """The `response_format` of a chat request asking for JSON of `schema`, in a server's dialect."""
    if dialect == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}
    if dialect == "json_object_schema":
        return {"type": "json_object", "schema": schema}
    if dialect == "json_object":
        return {"type": "json_object"}
    return None


def reply_schema(item_schema: type[BaseModel], key: str | None, max_items: int | None = None) -> dict:
    """JSON schema of a reply `{key: [item, ...]}` (or of the item itself when key is None)."""
    item = item_schema.model_json_schema()
    if key is None:
        return item
    defs = item.pop("$defs", None)
    array: dict[str, Any] = {"type": "array", "items": item, "minItems": 1}
    if max_items:
        array["maxItems"] = max_items
    schema = {"type": "object", "properties": {key: array}, "required": [key], "additionalProperties": False}
    return {**schema, "$defs": defs} if defs else schema


def _names_response_format(e: openai.APIStatusError) -> bool:
    """A refusal of the request's response_format (not of the model, key or messages). llama-cpp-python 0.3.36
    answers its validation error with 422 under older FastAPI releases and with 500 under current ones."""
    text = f"{e.message} {e.body}".lower()
    return e.status_code in (400, 422, 500) and ("response_format" in text or "json_schema" in text)


class LLMClient:
    """Chat with an OpenAI-compatible endpoint and get validated JSON back.

    cfg:       the run's `llm` section (endpoint, model, temperature, retries, timeout, re-asks)
    cache_dir: where responses are cached by request hash (None = no cache)
    """

    def __init__(self, cfg: LLMConfig, cache_dir: Path | None = None):
        self.cfg = cfg
        self.base_url = (cfg.base_url or OPENAI_BASE_URL).rstrip("/")
        self.model = cfg.model
        self.endpoint = f"LLM endpoint {self.base_url} (model {self.model})"
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._key = os.environ.get(cfg.api_key_env) or None
        if self._key is None:
            if urlparse(self.base_url).hostname not in LOCAL_HOSTS:
                raise LivoError(f"{self.endpoint} needs an API key: set the environment variable "
                                f"{cfg.api_key_env} (or llm.api_key_env to the variable that holds it)")
            self._key = "not-needed"  # local servers (vLLM, Ollama) ignore the key, the client needs one
        self._client = openai.OpenAI(base_url=self.base_url, api_key=self._key,
                                     max_retries=cfg.max_retries, timeout=cfg.timeout_s)
        # the structured-output dialect: fixed by the config, or found by the first request (auto)
        self.dialect: str | None = None if cfg.structured == "auto" else cfg.structured
        self.refused: list[str] = []        # dialects the endpoint refused (auto)
        self._dialect_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self.stats: Counter = Counter()     # requests, cached, reasked_malformed, cut, items_rejected

    def count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] += n

    def report(self) -> dict:
        """What this client did (recorded in a run's stats): dialect, requests, cache hits, re-asks."""
        with self._stats_lock:
            return {"endpoint": self.base_url, "model": self.model, "structured": self.cfg.structured,
                    "dialect": self.dialect, "refused_dialects": list(self.refused), **dict(sorted(self.stats.items()))}

    # ------------------------------------------------------------------ one JSON request
    def chat_json(self, template: str, variables: dict[str, Any], item_schema: type[BaseModel],
                  key: str | None, max_items: int | None = None) -> tuple[list[BaseModel], list[dict]]:
        """Render `livo_core/prompts/<template>` with `variables`, ask for JSON, validate the items.

        The reply must be a JSON object `{key: [item, ...]}`; each item is validated against
        `item_schema`. With key=None the whole object is the single item (e.g. the retriever's
        `{"value_id": ..., "reason": ...}`).
        Returns (items, rejections); a rejection is {"reason": str, "item": <the raw item>}.
        A reply that is not JSON of that shape is re-asked up to `llm.reask` times, then a LivoError.
        The request carries the reply's schema (`max_items`: most items asked for) in the server's dialect.
        """
        try:
            user = prompt_template(template).format(**variables)
        except FileNotFoundError:
            raise LivoError(f"LLM prompt template {PROMPTS_DIR / template} not found; "
                            f"choose one of {sorted(p.name for p in PROMPTS_DIR.glob('*.txt'))}") from None
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
        shape = f'{{"{key}": [...]}}' if key else "a single JSON object"
        schema = reply_schema(item_schema, key, max_items)

        cut = 0
        for attempt in range(self.cfg.reask + 1):
            text, finish = self._complete(messages, schema, accept=lambda t: _raw_items(t, key) is not None)
            raw_items = _raw_items(text, key)
            if raw_items is not None:
                items, rejections = _validate(raw_items, item_schema)
                self.count("items_rejected", len(rejections))
                return items, rejections
            if attempt == self.cfg.reask:
                break
            if finish == "length":   # cut at max_tokens: ask again for a shorter reply
                cut += 1
                log.warning("%s: reply %d was cut at llm.max_tokens = %d; re-asking for a shorter one", self.endpoint,
                            attempt + 1, self.cfg.max_tokens)
                note = (f"That reply was cut off at the length limit. Reply again with a shorter JSON object of the "
                        f"form {shape}: fewer or shorter items.")
            else:
                self.count("reasked_malformed")
                log.warning("%s: reply %d is not JSON of the form %s; re-asking", self.endpoint, attempt + 1, shape)
                note = f"That reply was not a JSON object of the form {shape}. Reply again with only that JSON object, with no text around it."
            # Show the model its own reply so it can correct it (and so the re-ask is a new request).
            messages = messages + [{"role": "assistant", "content": text}, {"role": "user", "content": note}]
        if finish == "length":
            raise LivoError(f"{self.endpoint}'s replies were cut at llm.max_tokens = {self.cfg.max_tokens} tokens "
                            f"{cut + 1} time(s) (finish_reason \"length\"); raise llm.max_tokens or lower llm.pairs_per_request")
        raise LivoError(f"{self.endpoint} did not reply with JSON of the form {shape} after "
                        f"{self.cfg.reask + 1} tries (last reply starts {text[:80]!r}); "
                        f"try another model, llm.structured = json_object_schema (llama-cpp-python) or raise llm.reask")

    # ------------------------------------------------------------------ one HTTP call, cached
    def _complete(self, messages: list[dict], schema: dict, accept) -> tuple[str, str | None]:
        """(reply text, finish_reason) for `messages`: from the cache, or from the server (then cached if accepted).

        The cache key is what the model is asked (endpoint, model, messages, temperature, max_tokens), not the
        dialect it is asked in: a rerun reads its answers whichever dialect a server speaks."""
        request = {"base_url": self.base_url, "model": self.model, "messages": messages,
                   "temperature": self.cfg.temperature, "max_tokens": self.cfg.max_tokens}
        digest = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
        path = self.cache_dir / f"{digest}.json" if self.cache_dir else None
        if path is not None and path.is_file():
            try:
                self.count("cached")
                return json.loads(path.read_text(encoding="utf-8"))["content"], "stop"
            except (ValueError, KeyError):
                pass   # a damaged cache file: ask again
        self.count("requests")
        response = self._structured(messages, schema, temperature=self.cfg.temperature, max_tokens=self.cfg.max_tokens)
        choice = response.choices[0] if response.choices else None
        text = ((choice.message.content if choice and choice.message else "") or "")
        finish = getattr(choice, "finish_reason", None)
        if finish == "length":
            self.count("cut")
        # Only answers we can use are cached: a bad one is asked again on a rerun, not replayed.
        if path is not None and accept(text):
            atomic_write_text(path, json.dumps({"request": request, "content": text}, indent=1))
            kill_point("llm.answer")
        return text, finish

    def _structured(self, messages: list[dict], schema: dict, **options):
        """One request carrying `schema` in the endpoint's dialect. With `auto` and no dialect known yet, every
        request in flight tries the preferred dialect not yet refused (no retries: a refusal, even as a 500, is
        not worth asking again); a 400/422/500 naming response_format drops that dialect for good, the first
        accepted one is remembered. Requests never wait for each other to find it."""
        retries = self.cfg.max_retries - 1   # for a request whose probe failed for another reason
        while self.dialect is None:
            with self._dialect_lock:
                dialect = self.dialect or next(d for d in DIALECTS if d not in self.refused)
            try:
                response = self._send(messages, dialect, schema, client=self._client.with_options(max_retries=0), **options)
            except openai.APIStatusError as e:
                if dialect != "none" and _names_response_format(e):
                    with self._dialect_lock:
                        if dialect not in self.refused and self.dialect is None:
                            log.warning("%s refused response_format %s (HTTP %d); trying the next dialect",
                                        self.endpoint, dialect, e.status_code)
                            self.refused.append(dialect)
                    continue
                if self.cfg.max_retries == 0 or not (e.status_code in (408, 409, 429) or e.status_code >= 500):
                    raise LivoError(self._failure(e)) from None   # what the client would not retry either
                break   # another failure: this dialect again, with the retries left (the probe was the first try)
            except openai.APIConnectionError as e:
                if self.cfg.max_retries == 0:
                    raise LivoError(self._failure(e)) from None
                break
            except Exception as e:
                raise LivoError(self._failure(e)) from None
            with self._dialect_lock:
                self.dialect = self.dialect or dialect
            return self._check_reply(response)
        else:
            dialect, retries = self.dialect, None
        try:
            client = None if retries is None else self._client.with_options(max_retries=retries)
            return self._check_reply(self._send(messages, dialect, schema, client=client, **options))
        except Exception as e:
            raise LivoError(self._failure(e)) from None

    def _send(self, messages: list[dict], dialect: str, schema: dict, client=None, **options):
        fmt = response_format(dialect, schema)
        return (client or self._client).chat.completions.create(model=self.model, messages=messages,
                                                                **({"response_format": fmt} if fmt else {}), **options)

    def _check_reply(self, response):
        if not hasattr(response, "choices"):   # a 200 whose body is not a chat completion (text, HTML, a proxy's page)
            raise LivoError(f"{self.endpoint} answered HTTP 200 with something that is not a chat completion "
                            f"({str(response)[:60]!r}); check llm.base_url (it usually ends in /v1)")
        return response

    def create(self, messages: list[dict], **options):
        """One chat completion (the client's retries included); every failure is a LivoError naming the endpoint."""
        try:
            response = self._client.chat.completions.create(model=self.model, messages=messages, **options)
        except Exception as e:
            raise LivoError(self._failure(e)) from None
        return self._check_reply(response)

    def probe(self) -> None:
        """One cheap request (GET /models) before any work: the endpoint answers and takes the key. A server
        without that route (404, 405, 501) still counts as answering."""
        try:
            self._client.with_options(max_retries=0).models.list()
        except openai.APIStatusError as e:
            if e.status_code not in (404, 405, 501):
                raise LivoError(self._failure(e)) from None
        except Exception as e:
            raise LivoError(self._failure(e)) from None

    def _failure(self, e: Exception) -> str:
        """The one-line message for a failed request."""
        if isinstance(e, LivoError):
            return str(e)
        if isinstance(e, openai.APITimeoutError):   # the server may be fine but slow (a long reply is still being written)
            return (f"{self.endpoint} did not answer within llm.timeout_s = {self.cfg.timeout_s:g} s "
                    f"({self.cfg.max_retries} retries); raise llm.timeout_s, or lower llm.max_tokens so replies end sooner")
        if isinstance(e, openai.APIConnectionError):
            cause = f" ({e.__cause__})" if e.__cause__ else ""
            return self._scrub(f"{self.endpoint} unreachable: {e}{cause}; check llm.base_url or that the server is running")
        if isinstance(e, openai.APIStatusError):
            return self._status_message(e)
        if isinstance(e, (ValueError, TypeError, KeyError, AttributeError)):   # JSONDecodeError is a ValueError
            return self._scrub(f"{self.endpoint} sent a reply that is not valid OpenAI JSON ({type(e).__name__}: "
                               f"{_first_line(str(e))[:80]}); check llm.base_url and that the server speaks the chat API")
        if isinstance(e, openai.OpenAIError):
            return self._scrub(f"{self.endpoint}: {_first_line(str(e))}; check llm.base_url and llm.model")
        raise e

    def _status_message(self, e: openai.APIStatusError) -> str:
        code = e.status_code
        if code in (401, 403):
            # The server's message may quote part of the key: leave it out.
            return (f"{self.endpoint} rejected the API key (HTTP {code}); "
                    f"check the key in the environment variable {self.cfg.api_key_env}")
        if code == 404:
            fix = "check llm.model and llm.base_url (it usually ends in /v1)"
        elif code == 429 or code >= 500:
            fix = f"the server is overloaded or failing after {self.cfg.max_retries} retries; retry later or raise llm.max_retries"
        else:
            fix = "the server rejected the request; check llm.model and that the server supports chat completions"
        return self._scrub(f"{self.endpoint} answered HTTP {code} ({_first_line(e.message)}); {fix}")

    def _scrub(self, message: str) -> str:
        return message.replace(self._key, "***") if self._key and self._key != "not-needed" else message


# ---------------------------------------------------------------------- parsing and validation
def parse_json_object(text: str) -> dict | None:
    """The JSON object in a model's reply, tolerating code fences and prose around it; None if none."""
    text = text.strip()
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, flags=re.DOTALL)
    candidates = [text] + ([fenced.group(1)] if fenced else [])
    if "{" in text:
        candidates.append(text[text.index("{"): text.rindex("}") + 1] if "}" in text else "")
    for candidate in candidates:
        try:
            data = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict):
            return data
    return None


def _raw_items(text: str, key: str | None) -> list | None:
    data = parse_json_object(text)
    if data is None:
        return None
    if key is None:
        return [data]
    items = data.get(key)
    return items if isinstance(items, list) else None


def _validate(raw_items: list, schema: type[BaseModel]) -> tuple[list[BaseModel], list[dict]]:
    items, rejections = [], []
    for raw in raw_items:
        if not isinstance(raw, dict):
            rejections.append({"reason": f"not a JSON object: {type(raw).__name__}", "item": raw})
            continue
        try:
            items.append(schema.model_validate(raw))
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "(item)"
            rejections.append({"reason": f"invalid field '{field}': {err['msg']}", "item": raw})
    return items, rejections


def _first_line(text: str) -> str:
    return (text or "").strip().splitlines()[0][:200] if (text or "").strip() else "no message"

"""Chat-completions request → ChatRequest, written once for the gateway and bulk jobs, and the
words both use to say why a request cannot be served (never echoing the input).

Errors name the offending field as OpenAI writes it (`messages.[2].content`, `max_tokens`), both
for the protocol's own checks and for the contract's, whose fields have other names
(`question` is the last user message)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from producers.openai.protocol import (
    NEUTRAL_MESSAGE_FIELDS,
    NEUTRAL_PARAMS,
    NEUTRAL_STREAM_OPTIONS,
    ChatCompletionMessage,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ResponseFormatParam,
    ResponseMessage,
    StreamOptions,
    TokenLogprobOut,
    TopLogprobOut,
)
from producers.requests import build_chat_request
from schemas import ChatMessage, ChatRequest, ChatResponse, TokenLogprob


class InvalidInput(ValueError):
    """A request ragbus cannot serve, in words for the client; `param` names the offending
    field as OpenAI writes it, when one is known. The gateway answers it with a 400, a bulk job
    with an error line."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code

    @classmethod
    def of_protocol(cls, err: ValidationError) -> InvalidInput:
        """A body that does not fit the protocol (ChatCompletionRequest's own checks)."""
        return cls(describe(err) or "invalid request", common_param([e.get("loc", ()) for e in err.errors()]))

    @classmethod
    def of_contract(cls, err: ValidationError) -> InvalidInput:
        """A request the contract (ChatRequest, SamplingParams) refuses."""
        first = err.errors()[0].get("loc", ()) if err.error_count() else ()
        if err.title == "SamplingParams":  # built on its own: its locations start inside it
            first = ("sampling", *first)
        return cls(describe(err), openai_param(first))


def parse_body(data: Any) -> ChatCompletionRequest:
    """A decoded JSON body as a ChatCompletionRequest; raises InvalidInput. A parameter ragbus does
    not honour is refused by name (code `unsupported_parameter`) unless it has its neutral value,
    and one it does not know at all is refused by name too (code `unknown_parameter`)."""
    if not isinstance(data, dict):
        raise InvalidInput("the body must be a JSON object", "body")
    body = drop_neutral(data, NEUTRAL_PARAMS, set(ChatCompletionRequest.model_fields), "")
    messages = body.get("messages")
    if isinstance(messages, list):
        fields = set(ChatCompletionMessage.model_fields)
        body["messages"] = [
            drop_neutral(m, NEUTRAL_MESSAGE_FIELDS, fields, f"messages.[{i}].") if isinstance(m, dict) else m
            for i, m in enumerate(messages)
        ]
    options = body.get("stream_options")
    if isinstance(options, dict):
        body["stream_options"] = drop_neutral(
            options, NEUTRAL_STREAM_OPTIONS, set(StreamOptions.model_fields), "stream_options."
        )
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        raise InvalidInput.of_protocol(e) from None


def drop_neutral(
    obj: dict[str, Any], neutral: dict[str, tuple[Any, str]], known: set[str], where: str
) -> dict[str, Any]:
    """`obj` without its neutral-only parameters; raises InvalidInput naming the first parameter
    that is neither honoured (`known`) nor at its neutral value. `where` prefixes the names
    (`messages.[0].`)."""
    unknown = [k for k in obj if k not in known and k not in neutral]
    if unknown:
        names = ", ".join(f"`{where}{k[:64]}`" for k in unknown[:5])
        raise InvalidInput(
            f"{names} {'is not a parameter' if len(unknown) == 1 else 'are not parameters'} ragbus "
            "knows; remove it (see the gateway's documentation for what is supported)",
            where + unknown[0][:64],
            "unknown_parameter",
        )
    for k, v in obj.items():
        if k in neutral and not neutral[k][0](v):
            raise InvalidInput(
                f"`{where}{k}` is not supported by ragbus; send {neutral[k][1]} or leave it out",
                where + k,
                "unsupported_parameter",
            )
    return {k: v for k, v in obj.items() if k not in neutral}


def to_chat_request(body: ChatCompletionRequest, **envelope: Any) -> ChatRequest:
    """The bus request of a chat-completions request; `envelope` is who asks and where
    (tenant_id, user_id, lane, request_id, timeout, ...), as `build_chat_request` takes it.
    Raises InvalidInput: messages that cannot become a question, or a value the contract refuses
    (its bounds are tighter than the protocol's)."""
    system, history, question = split_messages([m.model_dump(exclude_none=True) for m in body.messages])
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    stream = body.stream and envelope.get("lane", "chat") == "chat"
    if stream and body.n > 1:
        raise InvalidInput(
            "`n` > 1 with `stream` is not supported: stream one answer, or leave out `stream` for "
            f"{body.n} choices",
            "n",
            "unsupported_parameter",
        )
    if stream and body.logprobs:
        raise InvalidInput(
            "`logprobs` with `stream` is not supported: leave out `stream` to get them",
            "logprobs",
            "unsupported_parameter",
        )
    if body.top_logprobs and not body.logprobs:
        raise InvalidInput("`top_logprobs` needs `logprobs`: true", "top_logprobs")
    try:
        return build_chat_request(
            question,
            history=history,
            system_prompt=system,
            model=body.model,
            # Token events exist on the chat lane only; other lanes answer whole.
            stream=stream,
            sampling={
                "max_tokens": body.max_completion_tokens or body.max_tokens,
                "temperature": body.temperature,
                "top_p": body.top_p,
                "seed": body.seed,
                "stop": stop,
                "n": body.n,
                "logprobs": body.logprobs,
                "top_logprobs": body.top_logprobs,
                "response_format": response_format(body.response_format),
            },
            metadata=_metadata(body),
            **envelope,
        )
    except ValidationError as e:
        raise InvalidInput.of_contract(e) from None


def response_format(param: ResponseFormatParam | None) -> dict[str, Any] | None:
    """OpenAI's `response_format` as the contract's ResponseFormat fields (None: free text). A
    schema is checked to be a JSON Schema where `jsonschema` is installed (else the engine's grammar
    compiler is the first to read it); raises InvalidInput."""
    if param is None or param.type == "text":
        return None
    spec = param.json_schema
    if param.type == "json_object" or spec is None or spec.schema_ is None:
        # A json_schema without a schema: any JSON object, as json_object.
        return {"type": "json_object", "name": spec.name if spec else None}
    check_json_schema(spec.schema_)
    return {
        "type": "json_schema",
        "name": spec.name,
        "description": spec.description,
        "json_schema": spec.schema_,
        "strict": bool(spec.strict),
    }


def check_json_schema(schema: dict[str, Any]) -> None:
    """Raises InvalidInput when `schema` is not a valid JSON Schema (by its own `$schema` draft, else
    the latest); does nothing when `jsonschema` is not installed."""
    try:
        from jsonschema import exceptions, validators
    except ImportError:
        return
    try:
        validators.validator_for(schema).check_schema(schema)
    except exceptions.SchemaError as e:
        where = "/".join(str(p) for p in e.path) or "the top level"
        raise InvalidInput(
            f"response_format.json_schema.schema is not a valid JSON Schema (at {where[:200]}: "
            f"{e.validator} {str(e.validator_value)[:100]})",
            "response_format.json_schema.schema",
        ) from None


def to_choices(response: ChatResponse) -> list[Choice]:
    """The OpenAI choices of an answer: each of `response.choices` when the request asked for several
    or for logprobs, else the one `answer`. Written once for the gateway and bulk output lines."""
    if not response.choices:
        return [
            Choice(
                message=ResponseMessage(content=response.answer),
                finish_reason=response.finish_reason or "stop",
            )
        ]
    return [
        Choice(
            index=c.index,
            message=ResponseMessage(content=c.text),
            finish_reason=c.finish_reason,
            logprobs=None
            if c.logprobs is None
            else ChoiceLogprobs(content=[_logprob(t) for t in c.logprobs]),
        )
        for c in response.choices
    ]


def _logprob(t: TokenLogprob) -> TokenLogprobOut:
    """A contract logprob entry as OpenAI writes it (bytes as a list of integers)."""
    return TokenLogprobOut(
        token=t.token,
        logprob=t.logprob,
        bytes=None if t.bytes is None else list(t.bytes),
        top_logprobs=[
            TopLogprobOut(token=a.token, logprob=a.logprob, bytes=None if a.bytes is None else list(a.bytes))
            for a in t.top_logprobs
        ],
    )


def _metadata(body: ChatCompletionRequest) -> dict[str, str]:
    """What the request says about itself, kept with it on the bus and in the audit log."""
    meta = {"api": "openai"}
    if body.user:
        meta["openai_user"] = body.user
    if body.safety_identifier:
        meta["openai_safety_identifier"] = body.safety_identifier
    for k, v in (body.metadata or {}).items():
        meta[f"openai_metadata.{k}"] = v
    return meta


def _text_of(content: Any, where: str) -> str:
    """A message's content as text: a string, or a list of `{"type": "text", "text": str}` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for j, part in enumerate(content):
            text = part.get("text") if isinstance(part, dict) else None
            if not isinstance(part, dict) or part.get("type", "text") != "text" or not isinstance(text, str):
                raise InvalidInput(
                    f'{where}.[{j}]: only text parts are supported, as {{"type": "text", "text": "..."}}',
                    f"{where}.[{j}]",
                )
            texts.append(text)
        return "".join(texts)
    raise InvalidInput(f"{where}: must be a string or a list of text parts", where)


def split_messages(messages: list[Any]) -> tuple[str | None, list[ChatMessage], str]:
    """OpenAI messages → (system prompt, history, question = the last user message); raises
    InvalidInput."""
    system_parts: list[str] = []
    turns: list[ChatMessage] = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if not isinstance(role, str) or role not in ("system", "developer", "user", "assistant"):
            raise InvalidInput(
                f"messages.[{i}]: unsupported message; role is one of system, developer, user, assistant",
                f"messages.[{i}].role",
            )
        content = _text_of(m.get("content"), f"messages.[{i}].content")
        if role in ("system", "developer"):
            system_parts.append(content)
            continue
        try:
            turns.append(ChatMessage(role=role, content=content))  # type: ignore[arg-type]
        except ValidationError as e:
            raise InvalidInput(describe(e, f"messages.[{i}]."), f"messages.[{i}].content") from None
    if not turns or turns[-1].role != "user":
        raise InvalidInput("the last message must come from the user", "messages")
    return ("\n".join(system_parts) or None), turns[:-1], turns[-1].content


#: Where each ChatRequest field comes from in an OpenAI chat-completions request.
_OPENAI_FIELD = {
    "question": "messages",
    "history": "messages",
    "system_prompt": "messages",
    "model": "model",
    "custom_id": "custom_id",
    "metadata": "metadata",
    "client_ip": "X-Forwarded-For",
    # SamplingParams' own checks (not of one field) are about logprobs: with top_logprobs, and
    # their size.
    "sampling": "logprobs",
}


def loc_path(loc: Sequence[int | str]) -> str:
    """A validation error's location as OpenAI writes it: `("messages", 0, "content")` →
    `messages.[0].content`."""
    return ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc)


def openai_param(loc: Sequence[int | str]) -> str:
    """The OpenAI request field a ChatRequest validation error points at: `("sampling",
    "max_tokens")` → `max_tokens`, `("question",)` → `messages`."""
    if not loc:
        return "body"
    if loc[0] == "sampling" and len(loc) > 1:
        return str(loc[1])
    return _OPENAI_FIELD.get(str(loc[0]), str(loc[0]))


def common_param(locs: Sequence[Sequence[int | str]]) -> str | None:
    """The field a set of validation errors is about, as OpenAI writes it (`messages.[0].content`):
    the first error's location, cut back to what it shares with the other errors on the same
    field — so the alternatives of one union (`stop.str`, `stop.list[str]`) name `stop`."""
    cleaned = [tuple(x for x in loc if x != "body") for loc in locs]
    if not cleaned or not cleaned[0]:
        return None
    first = cleaned[0]
    prefix = list(first)
    for loc in cleaned[1:]:
        if loc[:1] != first[:1]:
            continue
        n = 0
        while n < min(len(prefix), len(loc)) and prefix[n] == loc[n]:
            n += 1
        del prefix[n:]
    return loc_path(prefix) or None


_WHAT = {
    "question": "the last user message",
    "history": "the messages before the last user message",
    "system_prompt": "the system messages together",
}


def describe(err: ValidationError, prefix: str = "", limit: int = 3) -> str:
    """A validation error in a few words per problem, naming fields and never echoing the input."""
    parts = []
    for e in err.errors()[:limit]:
        loc = e.get("loc", ())
        head, path = (str(loc[0]) if loc else ""), loc_path(loc)
        if prefix:
            where = prefix + path
        else:
            where = _WHAT.get(head) or (openai_param(loc) if head == "sampling" else path) or "request"
        parts.append(f"{where}: {e.get('msg')}")
    more = err.error_count() - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")

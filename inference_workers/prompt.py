"""Prompt building: system prompt, retrieved context numbered [1], [2], … for citations, the
conversation history and the question, rendered with the model's chat template and cut to fit its
context window.

What gives way when it does not fit, in order: the lowest-scored context chunks, then the oldest
history turns. A question that does not fit even alone is a `context_overflow` error (never a
request the engine would choke on).

Two things keep hostile text harmless and large prompts cheap:

- Content is never read as control tokens. Retrieved documents, questions, system prompts and
  history are data from outside; a chunk holding `<|im_start|>system ...` must reach the model as
  those characters, not as the template's markers. `encode_chat` renders the template around
  sentinels, tokenizes the template's own text with special tokens on and every piece of content
  with them off, and hands the engine the token ids (an `EncodedPrompt`), so the engine never
  re-reads the flat string.
- Fitting is linear in the prompt's size: every piece is counted once, pieces are dropped by
  subtracting their counts, and the prompt is rendered once and checked with one final count
  (re-rendering per dropped chunk made a 50-chunk, 200-turn prompt cost hundreds of renders).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from schemas import ChatMessage, Citation, EnrichedRequest, RetrievedChunk

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant. Answer the question using the numbered context passages. "
    "Cite the passages you use like [1]. If the context does not contain the answer, say so."
)
NO_CONTEXT_SYSTEM_PROMPT = "You are a helpful assistant. Answer the question concisely."

#: A completion needs at least this many tokens of room to be worth starting.
MIN_COMPLETION_TOKENS = 16

#: How many times the final count may send fitting back for more cuts (each round drops at least
#: one more piece; a template whose overhead is not additive needs one, almost never two).
_MAX_REFITS = 8


class ContextOverflow(ValueError):
    """The question (with the system prompt) alone does not fit the model's context window."""


class PromptInjection(ValueError):
    """Content tokenized to a control token although its tokenizer was told not to parse them."""


class EncodedPrompt(str):
    """A rendered prompt that carries the token ids the engine must run.

    It is the rendered text (for cache keys and logs), but the text alone cannot tell the template's
    markers from the same characters inside a document; the ids can, so engines generate from them.
    """

    token_ids: list[int]

    def __new__(cls, text: str, token_ids: Sequence[int]) -> EncodedPrompt:
        self = super().__new__(cls, text)
        self.token_ids = list(token_ids)
        return self

    def __reduce__(self) -> tuple[type[EncodedPrompt], tuple[str, list[int]]]:
        # Copies and pickles keep the ids (str's own reduction would drop them).
        return (EncodedPrompt, (str(self), self.token_ids))


@dataclass
class BuiltPrompt:
    text: str
    tokens: int
    chunks: list[RetrievedChunk] = field(default_factory=list)
    dropped_chunks: int = 0
    dropped_history: int = 0
    #: Completion tokens the prompt leaves room for (may be below the requested max_tokens).
    room: int = 0

    @property
    def token_ids(self) -> list[int] | None:
        """The ids the engine runs, when `text` came from an engine's `render` (else None)."""
        return self.text.token_ids if isinstance(self.text, EncodedPrompt) else None


Render = Callable[[list[dict[str, str]]], str]
Count = Callable[[str], int]
#: (text, special) -> ids; `special=True` lets the text's control-token markers become control tokens.
Tokenize = Callable[[str, bool], list[int]]


def encode_chat(
    messages: list[dict[str, str]],
    *,
    template: Render,
    tokenize: Tokenize,
    prefix: Sequence[int] = (),
    control_ids: Collection[int] = (),
) -> EncodedPrompt:
    """`messages` through the chat `template`, tokenized so that only the template makes control tokens.

    Each message's content is replaced by a sentinel no content can contain (a random tag between
    private-use characters), the template is rendered once, and the result is split at the
    sentinels: the template's own text is tokenized with special tokens parsed, each content piece
    without. `prefix` (a BOS the model wants) goes first. A content id found in `control_ids` means
    the tokenizer ignored the request, and the prompt is refused rather than run.
    """
    tag = secrets.token_hex(8)
    skeleton = [{**m, "content": f"\ue000{tag}.{i}\ue001"} for i, m in enumerate(messages)]
    rendered = template(skeleton)
    ids = list(prefix)
    text: list[str] = []

    def add_template(piece: str) -> None:
        if "\ue000" in piece or "\ue001" in piece:
            raise ValueError(
                "the chat template altered a message's content (a sentinel came out changed), so the "
                "content cannot be kept apart from the template's markers; use a template that inserts "
                "message content unchanged"
            )
        if piece:
            ids.extend(tokenize(piece, True))
            text.append(piece)

    pos = 0
    for m in re.finditer(f"\ue000{tag}\\.(\\d+)\ue001", rendered):
        add_template(rendered[pos : m.start()])
        content = messages[int(m.group(1))]["content"]
        if content:
            piece_ids = tokenize(content, False)
            if control_ids and not set(piece_ids).isdisjoint(control_ids):
                raise PromptInjection(
                    "message content tokenized to control tokens although special-token parsing was "
                    "off; the tokenizer does not honour it, so the prompt is refused"
                )
            ids.extend(piece_ids)
            text.append(content)
        pos = m.end()
    add_template(rendered[pos:])
    return EncodedPrompt("".join(text), ids)


def chunk_line(number: int, chunk: RetrievedChunk) -> str:
    title = f" ({chunk.title})" if chunk.title else ""
    return f"[{number}]{title} {chunk.text.strip()}"


def context_block(chunks: list[RetrievedChunk]) -> str:
    return "\n".join(chunk_line(i, chunk) for i, chunk in enumerate(chunks, start=1))


_CONTEXT_HEAD = "Context:\n"
_QUESTION_HEAD = "\n\nQuestion: "


def system_for(system_prompt: str | None, *, with_context: bool) -> str:
    return system_prompt or (DEFAULT_SYSTEM_PROMPT if with_context else NO_CONTEXT_SYSTEM_PROMPT)


def messages_for(
    question: str,
    *,
    system_prompt: str | None,
    chunks: list[RetrievedChunk],
    history: list[ChatMessage],
) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_for(system_prompt, with_context=bool(chunks))}]
    messages.extend({"role": m.role, "content": m.content} for m in history if m.role != "system")
    user = f"{_CONTEXT_HEAD}{context_block(chunks)}{_QUESTION_HEAD}{question}" if chunks else question
    messages.append({"role": "user", "content": user})
    return messages


@dataclass
class PieceCounts:
    """Token counts of every piece of a prompt, each counted once (the input of `fit`)."""

    #: Per chunk, in retrieval order: its numbered context line.
    chunks: list[int]
    #: Per chunk, in retrieval order: its retrieval score (lowest goes first).
    scores: list[float]
    #: Per history turn, oldest first: its content.
    history: list[int]
    #: The system prompt when context is present / when none is.
    system_with_context: int
    system_plain: int
    #: The question alone.
    question: int
    #: Around the context: the "Context:" head, the question head, and one line separator.
    context_frame: int
    separator: int
    #: The chat template's own tokens with no history, and what each history turn adds to them.
    template_bare: int
    turn_template: list[int]


@dataclass
class Fit:
    """Which pieces survive: chunk indexes (retrieval order) and the number of newest turns kept."""

    chunks: list[int]
    history: int
    estimate: int


def fit(counts: PieceCounts, budget: int, *, correction: int = 0) -> Fit:
    """The most content whose estimated tokens fit `budget`, dropping lowest-scored chunks first,
    then oldest history turns. Linear after one sort: each drop subtracts its piece's count.

    The template's tokens are taken as additive: the no-history skeleton plus what a turn of each
    role adds. `correction` is what an earlier final count found beyond the estimate; it is added to
    every estimate here.
    """
    n_hist = len(counts.history)
    # Highest score first decides what survives; the survivors keep their retrieval order.
    order = sorted(range(len(counts.chunks)), key=lambda i: counts.scores[i], reverse=True)
    keep = len(order)
    context = sum(counts.chunks) + counts.context_frame + counts.separator * max(keep - 1, 0)
    keep_history = n_hist
    history = sum(counts.history) + sum(counts.turn_template)

    def estimate() -> int:
        user = context + counts.question if keep else counts.question
        system = counts.system_with_context if keep else counts.system_plain
        return counts.template_bare + history + system + user + correction

    while estimate() > budget and (keep or keep_history):
        if keep:
            keep -= 1
            context -= counts.chunks[order[keep]] + (counts.separator if keep else 0)
        else:
            history -= counts.history[n_hist - keep_history] + counts.turn_template[n_hist - keep_history]
            keep_history -= 1
    return Fit(chunks=sorted(order[:keep]), history=keep_history, estimate=estimate())


def count_pieces(
    enriched: EnrichedRequest, history: list[ChatMessage], *, render: Render, count: Count
) -> PieceCounts:
    """Count every piece of `enriched`'s prompt once, and the template's skeleton once per role."""
    req = enriched.request
    chunks = enriched.chunks

    def skeleton(turns: list[ChatMessage]) -> int:
        # Empty contents: what is left is the template's own tokens for this many messages.
        msgs = [{"role": "system", "content": ""}]
        msgs.extend({"role": m.role, "content": ""} for m in turns)
        msgs.append({"role": "user", "content": ""})
        return count(render(msgs))

    bare = skeleton([])
    per_role = {
        role: skeleton([ChatMessage(role=role, content="")]) - bare for role in {m.role for m in history}
    }
    system_with_context = count(system_for(req.system_prompt, with_context=True))
    return PieceCounts(
        chunks=[count(chunk_line(i, c)) for i, c in enumerate(chunks, start=1)],
        scores=[c.score for c in chunks],
        history=[count(m.content) for m in history],
        system_with_context=system_with_context,
        system_plain=(
            system_with_context if req.system_prompt else count(system_for(None, with_context=False))
        ),
        question=count(req.question),
        context_frame=count(_CONTEXT_HEAD) + count(_QUESTION_HEAD) if chunks else 0,
        separator=count("\n") if len(chunks) > 1 else 0,
        template_bare=bare,
        turn_template=[per_role[m.role] for m in history],
    )


def build_prompt(
    enriched: EnrichedRequest, *, render: Render, count: Count, context_window: int
) -> BuiltPrompt:
    """The rendered prompt that fits `context_window` with room for the requested completion.

    `render` is the engine's (returning an `EncodedPrompt` whose ids the engine runs) and `count`
    counts a piece of content as text, or a rendered prompt as its ids.
    """
    req = enriched.request
    want = req.sampling.max_tokens
    history = [m for m in req.history if m.role != "system"]
    counts = count_pieces(enriched, history, render=render, count=count)
    budget = context_window - want
    correction = 0
    for _ in range(_MAX_REFITS + 1):
        chosen = fit(counts, budget, correction=correction)
        chunks = [enriched.chunks[i] for i in chosen.chunks]
        text = render(
            messages_for(
                req.question,
                system_prompt=req.system_prompt,
                chunks=chunks,
                history=history[len(history) - chosen.history :],
            )
        )
        tokens = count(text)
        if tokens <= budget or not (chosen.chunks or chosen.history):
            break
        # The template or the pieces' joins cost more than estimated: carry the difference into the
        # estimates, which makes the next round cut at least one more piece.
        correction += max(tokens - chosen.estimate, 1)
    room = context_window - tokens
    if room < min(want, MIN_COMPLETION_TOKENS):
        raise ContextOverflow(
            f"the question needs {tokens} prompt tokens; the model's context window is {context_window} "
            f"tokens, leaving no room for an answer even without context and history"
        )
    return BuiltPrompt(
        text=text,
        tokens=tokens,
        chunks=chunks,
        dropped_chunks=len(enriched.chunks) - len(chosen.chunks),
        dropped_history=len(history) - chosen.history,
        room=room,
    )


_MARKER = re.compile(r"\[(\d{1,3})\]")


def citations_for(answer: str, chunks: list[RetrievedChunk]) -> list[Citation]:
    """The chunks the answer cites with [n]; when it cites none, every chunk it was given."""
    cited = sorted({int(m) for m in _MARKER.findall(answer) if 1 <= int(m) <= len(chunks)})
    indexes = cited or list(range(1, len(chunks) + 1))
    return [
        Citation(
            index=i,
            doc_id=chunks[i - 1].doc_id,
            chunk_id=chunks[i - 1].chunk_id,
            source=chunks[i - 1].source,
            title=chunks[i - 1].title,
            score=chunks[i - 1].score,
        )
        for i in indexes
    ]

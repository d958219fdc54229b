"""The OpenAI-compatible routes: `POST /v1/chat/completions` (ChatGLM3 tools included), `POST /v1/completions`
(raw prompts) and `GET /v1/models`; each completion streamed as SSE or answered whole, with `n` choices.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request

from glmtune.templates import ToolCall
from glmtune_inference.api_schema import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    DeltaToolCall,
    ModelCard,
    ModelList,
)
from glmtune_inference.app_state import ERROR_RESPONSES, authorized, served_model, state, submit
from glmtune_inference.chat_answers import (
    AnswerReader,
    chat_logprobs,
    completion_logprobs,
    tool_call_body,
)
from glmtune_inference.generation import TokenLogprob
from glmtune_inference.handles import Finished, TextDelta
from glmtune_inference.openai_prompts import (
    chat_prompt,
    choice_params,
    completion_prompts,
    requested_logprobs,
)
from glmtune_inference.streaming import Event, RequestRun, sse_response

router = APIRouter(prefix="/v1", dependencies=[Depends(authorized)], responses=ERROR_RESPONSES)
_STREAMED = {200: {"content": {"text/event-stream": {}}}}


@router.post("/chat/completions", response_model=ChatCompletion, responses=_STREAMED)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    """A chat answer (or `n`), through the model's own chat template."""
    start = time.perf_counter()
    served = served_model(request, body.model)
    prompt = chat_prompt(request, served, body)
    max_tokens = body.max_completion_tokens or body.max_tokens
    params = choice_params(request, served, body, 1, max_tokens, requested_logprobs(body))
    if state(request).settings.log_prompts:
        request.state.access["prompt"] = [m.model_dump(exclude_none=True) for m in body.messages]
    run = RequestRun(request, submit(request, body.model, [(prompt.ids, p) for p in params]), start)
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    readers = [AnswerReader(prompt) for _ in params]
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(choices: list[ChunkChoice], **extra) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=completion_id, created=created, model=body.model, choices=choices, **extra)

        async def chunks(events: AsyncIterator[Event]) -> AsyncIterator[ChatCompletionChunk]:
            yield chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content="")) for i in range(len(params))])
            async for index, event in events:
                logprobs = run.new_logprobs(index, event) if body.logprobs else ()
                yield chunk([_chat_delta(served.tokenizer, readers[index], index, event, logprobs)])
            if usage:
                yield chunk([], usage=run.usage(body.n))

        return sse_response(run, chunks)
    choices = []
    for index, done in enumerate(await run.collect()):
        content, call = readers[index].finish(done.text)
        message = AssistantMessage(content=content, tool_calls=None if call is None else [tool_call_body(call)])
        logprobs = chat_logprobs(served.tokenizer, done.logprobs) if body.logprobs else None
        choices.append(Choice(index=index, message=message, logprobs=logprobs, finish_reason=_reason(done, call)))
    return ChatCompletion(id=completion_id, created=created, model=body.model, choices=choices, usage=run.usage(body.n))


def _chat_delta(tokenizer, reader: AnswerReader, index: int, event: TextDelta | Finished,
                logprobs: tuple[TokenLogprob, ...]) -> ChunkChoice:
    """The chunk choice of one event: the content it releases, or at the end the rest, the call and the reason."""
    shown = chat_logprobs(tokenizer, logprobs) if logprobs else None
    if isinstance(event, TextDelta):
        return ChunkChoice(index=index, delta=Delta(content=reader.push(event.text)), logprobs=shown)
    _, call = reader.finish(event.text)
    if call is not None:
        delta = Delta(tool_calls=[DeltaToolCall(index=0, **tool_call_body(call).model_dump())])
    else:
        delta = Delta(content=reader.rest(event.text) or None)
    return ChunkChoice(index=index, delta=delta, logprobs=shown, finish_reason=_reason(event, call))


def _reason(done: Finished, call: ToolCall | None) -> str:
    """`tool_calls` for a complete call (a call cut by max_tokens stays `length`)."""
    return "tool_calls" if call is not None and done.reason == "stop" else done.reason


@router.post("/completions", response_model=Completion, responses=_STREAMED)
async def completions(body: CompletionRequest, request: Request):
    """Continuations of raw prompts (no chat template), `n` per prompt."""
    start = time.perf_counter()
    served = served_model(request, body.model)
    prompts = completion_prompts(request, served, body)
    params = choice_params(request, served, body, len(prompts), body.max_tokens, body.logprobs)
    if state(request).settings.log_prompts:
        request.state.access["prompt"] = body.prompts()
    choices = [(prompts[i // body.n], p) for i, p in enumerate(params)]
    run = RequestRun(request, submit(request, body.model, choices), start)
    completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    texts = body.prompts()
    echo = [texts[i // body.n] if body.echo else "" for i in range(len(params))]
    tokenizer = served.tokenizer

    def completion(choices: list[CompletionChoice], **extra) -> Completion:
        return Completion(id=completion_id, created=created, model=body.model, choices=choices, **extra)

    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        offsets = [0] * len(params)  # characters of each choice's text sent so far

        async def chunks(events: AsyncIterator[Event]) -> AsyncIterator[Completion]:
            async for index, event in events:
                text = echo[index] + (event.text if isinstance(event, TextDelta) else "")
                echo[index] = ""  # the prompt is echoed once, before the choice's first text
                logprobs = None
                if body.logprobs is not None:
                    logprobs = completion_logprobs(tokenizer, run.new_logprobs(index, event), offsets[index])
                offsets[index] += len(text)
                reason = event.reason if isinstance(event, Finished) else None
                yield completion([CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=reason)])
            if usage:
                yield completion([], usage=run.usage(body.n))

        return sse_response(run, chunks)
    choices_out = []
    for index, done in enumerate(await run.collect()):
        logprobs = None if body.logprobs is None else completion_logprobs(tokenizer, done.logprobs, 0)
        choices_out.append(CompletionChoice(index=index, text=echo[index] + done.text, logprobs=logprobs,
                                            finish_reason=done.reason))
    return completion(choices_out, usage=run.usage(body.n))


@router.get("/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    """The model names this server answers to."""
    return ModelList(data=[ModelCard(id=m.name, created=m.created) for m in state(request).models.values()])

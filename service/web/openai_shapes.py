"""What /v1/completions and /v1/chat/completions answer alike, in OpenAI's terms: finish reasons and usage."""

from __future__ import annotations

from charrnn.service.web.schemas import CompletionUsage


def openai_finish_reason(reason: str) -> str:
    """OpenAI's finish reasons: a generation cut by the server's deadline ran out of length."""
    return "stop" if reason == "stop" else "length"


def openai_usage(prompt_ids: list[tuple[int, ...]], generated: int) -> CompletionUsage:
    """OpenAI's usage: each prompt (one entry of `prompt_ids`) counted once per request, whatever `n`,
    `best_of` or `echo`; `generated` counts every character of every sample."""
    prompt = sum(len(ids) for ids in prompt_ids)
    return CompletionUsage(prompt_tokens=prompt, completion_tokens=generated, total_tokens=prompt + generated)

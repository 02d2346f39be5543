"""Domain exceptions.

Every failure a user can cause or meet has a type here. The CLI and the server each keep one table
that maps these to an `Error: ...` line or an OpenAI-style error body; nothing else formats errors.
"""

from __future__ import annotations


class GgufchatError(Exception):
    """Base class. `hint` is the next step to take, shown after the message."""

    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    @property
    def message(self) -> str:
        return str(self)


class ModelNotFound(GgufchatError):
    hint = "Pass a path to a .gguf file with -m, or run `ggufchat doctor` to see the default model."


class InvalidModelFile(GgufchatError):
    """The file exists but is not a loadable GGUF (wrong magic, truncated, unsupported)."""

    hint = "Re-download the file; a complete GGUF starts with the bytes 'GGUF'."


class ModelLoadError(GgufchatError):
    """llama.cpp refused the model or the context (out of memory, bad parameters)."""


class InvalidParameter(GgufchatError):
    def __init__(self, message: str, *, param: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.param = param


class ContextOverflow(GgufchatError):
    """A prompt does not fit in the context a sequence has."""

    def __init__(self, n_prompt: int, n_ctx: int) -> None:
        super().__init__(
            f"the prompt is {n_prompt} tokens but a sequence has room for {n_ctx} tokens",
            hint="Shorten the prompt, or raise the context with -c/--ctx-size.",
        )
        self.n_prompt = n_prompt
        self.n_ctx = n_ctx


class TemplateError(GgufchatError):
    hint = "Pick a built-in template with --chat-template NAME or supply one with --chat-template-file."


class DownloadError(GgufchatError):
    """A download failed; nothing half-written was left where models are looked up."""


class EngineStopped(GgufchatError):
    """The engine was closed, or its decode loop failed, while a request was pending."""


class DecodeError(GgufchatError):
    """llama_decode returned a fatal status."""


class QueueFull(GgufchatError):
    """Every sequence is busy and the wait queue is full."""

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, hint=f"Retry after {retry_after} s, or start the server with more -np / "
                                       "--max-queue.")
        self.retry_after = retry_after


class NoRoom(GgufchatError):
    """A model cannot be loaded now: the memory budget or --max-loaded is full of models answering
    requests, and none became free in time."""

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, hint="Retry shortly, or start the server with a larger --memory-budget or "
                                       "--max-loaded.")
        self.retry_after = retry_after


class RequestTimeout(GgufchatError):
    """A request ran past the server's --timeout."""


class Unsupported(InvalidParameter):
    """A request asks for something this server does not do (rather than silently ignoring it)."""


class BuildError(GgufchatError):
    """`ggufchat build` cannot start (a missing toolkit, driver or compiler), failed, or built the wrong thing."""

"""The teacher API key: read from the environment or a Prefect Secret block, and kept out of every output.

The key lives only in the ``openai`` client's memory. ``redact`` scrubs it from any text that leaves the
collector (failure reasons, log records); ``RedactingFilter`` does the same for log handlers.
"""

from __future__ import annotations

import logging
import os

from teacher.settings import TeacherSettings

REDACTED = "[REDACTED]"


class SecretError(RuntimeError):
    """The configured source of the API key does not yield one."""


def resolve_api_key(settings: TeacherSettings, required: bool) -> str | None:
    """The key from the Prefect Secret block named in settings, else from the environment variable named there.

    ``required`` is False for the local teacher (no key needed unless it was started with one).
    """
    if settings.api_key_secret_block:
        from prefect.blocks.system import Secret

        try:
            value = Secret.load(settings.api_key_secret_block).get()
        except ValueError as exc:
            raise SecretError(
                f"Prefect Secret block '{settings.api_key_secret_block}' could not be loaded: {type(exc).__name__}"
            ) from None
        return str(value)
    value = os.environ.get(settings.api_key_env)
    if not value and required:
        raise SecretError(
            f"no API key: set the environment variable {settings.api_key_env} "
            "or name a Prefect Secret block in teacher.api_key_secret_block"
        )
    return value or None


def redact(text: str, *secrets: str | None) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


class RedactingFilter(logging.Filter):
    """Replaces the secret in a record's rendered message (arguments included) before any handler sees it."""

    def __init__(self, secret: str) -> None:
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.secret in message:
            record.msg, record.args = redact(message, self.secret), None
        return True


def install_redaction(secret: str | None) -> None:
    """Attach a ``RedactingFilter`` to every handler of the root logger (handlers see propagated records)."""
    if not secret:
        return
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) and f.secret == secret for f in handler.filters):
            handler.addFilter(RedactingFilter(secret))

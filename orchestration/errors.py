"""Errors of the orchestration layer: a UsageError becomes one line on stderr and exit status 2."""

from __future__ import annotations


class OrchestrationError(Exception):
    """Base of every error raised by orchestration/."""


class UsageError(OrchestrationError, ValueError):
    """The user asked for something impossible (bad flag, bad config value, missing file)."""


class ConfigError(UsageError):
    """A configuration field is unknown or out of range; the message names the field."""

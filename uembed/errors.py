"""Errors a user can fix (bad config, manifest, checkpoint): the CLI prints them as one line."""


class UserError(Exception):
    """Base of every error whose message is enough to fix the problem."""

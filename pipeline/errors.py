"""Errors a user can act on; the CLI prints them as one message and exits 2."""


class UserError(Exception):
    """An error caused by input the user controls (file, key, value); printed as one clear message."""

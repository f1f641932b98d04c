"""The one base of every error that is the user's to fix (a parameter, a data file, a model, a name):
stages report it as one line without a traceback (`stages.common.reported`); anything else is a bug
and keeps its traceback."""

from __future__ import annotations


class UserError(ValueError):
    """A problem with the inputs a user gave; the message names the parameter or file."""

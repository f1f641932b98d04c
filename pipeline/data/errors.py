"""The one exception type of the data layer."""

from __future__ import annotations

from pipeline.errors import UserError


class DataError(UserError):
    """Bad data configuration or input; the message is one line naming the parameter or file."""

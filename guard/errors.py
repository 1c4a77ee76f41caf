"""The one root of underfire's errors: bad input a user can fix (a setting, a model, a file, a folder).

Every error the library raises on purpose is an :class:`UnderfireError`; its ``exit_code`` is the CLI's exit
status (1: bad input; 4: refused, the deployment cannot be measured). The CLI prints these as one ``Error:``
line; anything else is a bug in underfire (or in code it called) and is shown as an internal error. A subclass
of ``ValueError`` too, so code that caught ``ValueError`` around the library keeps working.
"""

from __future__ import annotations


class UnderfireError(ValueError):
    """Bad input a user can fix; the message names the problem and the fix."""

    exit_code = 1


class ModelError(UnderfireError):
    """A model cannot be built or loaded; the message says why and what to do."""


class CamUnsupportedError(ModelError):
    """The model's head is not global-average-pool + one linear layer, which CAM needs."""

"""One exception type for user-facing faults.

The CLI turns a MechError into a one-line message and exit code 2; library callers catch it like any
exception. The message names the fault *and* the fix, e.g.
``unknown model spec 'orgnism': expected organism, smollm2-135m, a local HF directory or a hub id``.
"""


class MechError(Exception):
    """A fault in user input (config, model spec, data) with a one-line, actionable message."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line

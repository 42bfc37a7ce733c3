"""The one exception type that means "the user gave us something we cannot use".

The CLI turns it into a single line on stderr and exit code 2; Python callers can catch it.
"""


class StoryGPTError(Exception):
    """Bad input: a missing file, a wrong format, an out-of-range value, a corrupt checkpoint."""

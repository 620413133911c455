"""The one base of every depthjax error.

Each module keeps its own error class (named for what went wrong there) and derives it from
`DepthjaxError`, a `ValueError`, so `except ValueError` keeps working and the command line
turns any of them into a clear message and exit status 2 by catching this one class.
"""


class DepthjaxError(ValueError):
    """Bad input or settings that depthjax refuses with a message naming the problem."""

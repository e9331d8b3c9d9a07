"""Errors the user can act on. Each renders as ONE line naming the file or key and the fix.

Exit codes mean one thing each, for every task (README, "Exit codes"):

    0  every enabled check passed
    1  a check failed
    2  bad input or configuration: anything the user must fix (matrix.yaml, a dataset file, the
       checkpoint, a toolkit file, a full disk, a read-only workspace)
    3  a required target could not run (skipped, or a stage failed for a reason that is not the
       user's input: a crash, a timeout, a missing image, the Docker engine)
    130  interrupted (Ctrl-C)

When several apply, the first in the order 2, 3, 1 wins: a fault the user must fix explains the
rest (a broken checkpoint also leaves every backend unable to run).
"""

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130


def worst_exit(codes: "list[int]") -> int:
    """The run's exit code from its parts' codes (precedence 2, 3, 1, 0)."""
    for code in (EXIT_BAD_INPUT, EXIT_UNAVAILABLE, EXIT_CHECK_FAILED):
        if code in codes:
            return code
    return EXIT_OK


class ModelMatrixError(Exception):
    """Base class: str(exc) is the one-line message shown to the user (exit code 2)."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(ModelMatrixError):
    pass


class DataError(ModelMatrixError):
    pass


class StageFailed(ModelMatrixError):
    """A stage ran and failed. ``log_tail`` holds the last lines of its output. ``user_error``: the
    stage said the problem is in the user's input (the stage contract's exit 2, `error:` line)."""

    exit_code = EXIT_UNAVAILABLE

    def __init__(self, message: str, log_tail: str = "", user_error: bool = False):
        super().__init__(message)
        self.log_tail = log_tail
        self.user_error = user_error
        if user_error:
            self.exit_code = EXIT_BAD_INPUT


class TargetUnavailable(ModelMatrixError):
    """A required target could not run (the run's verdict, exit 3)."""

    exit_code = EXIT_UNAVAILABLE


# --------------------------------------------------------------------------- images and Docker


class DockerError(ModelMatrixError):
    """The Docker engine could not be reached, or refused a request."""

    exit_code = EXIT_UNAVAILABLE


class ImageMissing(ModelMatrixError):
    """A target image (or its base) is not available locally; the message names the command to run."""

    exit_code = EXIT_UNAVAILABLE


class UserFileMissing(ImageMissing):
    """A file the user must supply for an image build (a vendor installer) was not given: the target
    cannot be built here (skipped, with how to supply it), unlike a given file whose sha256 is wrong."""


class BuildFailed(ModelMatrixError):
    """An image build failed. ``log_tail`` holds the output of the failing step."""

    exit_code = EXIT_UNAVAILABLE

    def __init__(self, message: str, log_tail: str = ""):
        super().__init__(message)
        self.log_tail = log_tail

"""Errors the user can act on. Each renders as ONE line naming the file or key and the fix."""


class ModelMatrixError(Exception):
    """Base class: str(exc) is the one-line message shown to the user (exit code 2)."""

    exit_code = 2


class ConfigError(ModelMatrixError):
    pass


class DataError(ModelMatrixError):
    pass


class StageFailed(ModelMatrixError):
    """A stage ran and failed. ``log_tail`` holds the last lines of its output."""

    def __init__(self, message: str, log_tail: str = ""):
        super().__init__(message)
        self.log_tail = log_tail




# --------------------------------------------------------------------------- images and Docker


class DockerError(ModelMatrixError):
    """The Docker engine could not be reached, or refused a request."""


class ImageMissing(ModelMatrixError):
    """A target image (or its base) is not available locally; the message names the command to run."""


class BuildFailed(ModelMatrixError):
    """An image build failed. ``log_tail`` holds the output of the failing step."""

    def __init__(self, message: str, log_tail: str = ""):
        super().__init__(message)
        self.log_tail = log_tail

"""User-facing errors: each message names the problem and the fix, on one line."""


class Moeq2ggufError(Exception):
    """Bad input or an unsupported request; the CLI prints the message and exits with code 2."""


class UnsupportedArchitectureError(Moeq2ggufError):
    pass


class CheckpointError(Moeq2ggufError):
    pass


class TokenizerError(Moeq2ggufError):
    pass


class WeightError(Moeq2ggufError):
    """A checkpoint tensor that cannot be written as asked (NaN/Inf values, out of the target type's range)."""

"""Error types: each carries a message for a person; the CLI prints it as one line."""


class MoeLocalError(Exception):
    """Base of every error moe-local reports to the user."""


class CheckpointError(MoeLocalError):
    """A model folder, shard or tensor is missing, truncated, corrupt or inconsistent."""


class ConfigError(MoeLocalError):
    """config.json describes something we cannot run."""


class BudgetError(MoeLocalError):
    """The memory budget cannot hold what must be resident."""


class TokenizerError(MoeLocalError):
    """No usable tokenizer, or a chat template that fails."""

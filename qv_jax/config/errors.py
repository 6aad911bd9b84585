"""The error type of config validation."""


class ConfigError(ValueError):
  """A config field holds a value the model cannot use; the message names the field."""

  def __init__(self, field: str, message: str | None = None):
    # One argument: an already formatted message (libraries such as absl re-raise with `type(e)(text)`).
    super().__init__(field if message is None else f"config field `{field}`: {message}")
    self.field = field if message is not None else ""


def require(condition: bool, field: str, message: str) -> None:
  """Raises `ConfigError(field, message)` unless `condition`."""
  if not condition:
    raise ConfigError(field, message)

"""The error type of config validation."""


class ConfigError(ValueError):
  """A config field holds a value the model cannot use; the message names the field."""

  def __init__(self, field: str, message: str):
    super().__init__(f"config field `{field}`: {message}")
    self.field = field


def require(condition: bool, field: str, message: str) -> None:
  """Raises `ConfigError(field, message)` unless `condition`."""
  if not condition:
    raise ConfigError(field, message)

"""The process runtime: persistent rank worlds (orchestrator), the driver-to-rank request
channel, the rank loop and its forensics (per-rank tracebacks, stack dumps, exit codes).

It hosts implementations but is not one: impl/ never imports it (checked by import-linter,
[tool.importlinter] in pyproject.toml)."""

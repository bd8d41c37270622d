"""Configuration: settings dataclasses (`config.settings`), the preset table (`config.presets`), the resolved
`Config` (`config.resolved`) and the command line (`config.cli`). Nothing is imported here, so `models/` can import
the leaf modules without importing the command line, which imports the method registry."""

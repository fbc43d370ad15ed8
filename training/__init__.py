"""Training and evaluation: ``pixseek train``, ``pixseek eval`` and what they run.

Installed as ``pixseek.training``. Nothing that indexes or searches imports it (the import
contracts in pyproject.toml say so); the CLI loads these commands only when they are run.
"""

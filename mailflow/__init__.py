"""mailflow: Postfix's architecture rebuilt as one asyncio process.

Public names: `Mailflow` (the server object, `async with`), `load_config`, `Config`.
They are imported lazily so that `import mailflow.config` does not pull in the whole server.
"""
__version__ = "0.1.0"

__all__ = ["Mailflow", "Config", "load_config", "__version__"]


def __getattr__(name: str):
    if name == "Mailflow":
        from mailflow.app import Mailflow

        return Mailflow
    if name in ("Config", "load_config"):
        from mailflow import config

        return getattr(config, name)
    raise AttributeError(name)

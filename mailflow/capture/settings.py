"""The settings that make a server capture everything: what `mailflow serve --sink` (and `[sink] enable`) lays
over the configuration, and what the embedded Sink starts from.

    CAPTURE_EVERYTHING        no local domains, every address class to the `capture` transport (one next hop,
                              so that a message is captured once with all its recipients), any recipient accepted
                              (relaying is still refused to clients outside mynetworks)
    merged(base, *layers)     nested settings dictionaries laid one over another (a section's keys merge)
    capture_server(config, queue_directory) -> Config   `config` as a capture server: CAPTURE_EVERYTHING, [sink]
                              enabled, the queue in `queue_directory`

Failure behaviour: `capture_server` raises ConfigError (mailflow.config) if the result is not a valid
configuration.
"""
from __future__ import annotations

from mailflow.config import Config, config_from_dict

CAPTURE_TRANSPORT = "capture:sink"  # one next hop for every domain: a message's recipients stay one capture
CAPTURE_EVERYTHING: dict = {
    "mydestination": [],
    "local_transport": CAPTURE_TRANSPORT,
    "virtual_transport": CAPTURE_TRANSPORT,
    "relay_transport": CAPTURE_TRANSPORT,
    "default_transport": CAPTURE_TRANSPORT,
    "smtpd": {"reject_unlisted_recipient": False},
}


def merged(base: dict, *layers: dict) -> dict:
    """`base` with each layer laid over it in turn; a dictionary value merges into the one below it."""
    out = dict(base)
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merged(out[key], value)
            else:
                out[key] = value
    return out


def capture_server(config: Config, queue_directory: str) -> Config:
    """See the module docstring."""
    data = merged(config.model_dump(), CAPTURE_EVERYTHING,
                  {"sink": {"enable": True}, "queue_directory": queue_directory})
    return config_from_dict(data, "mailflow serve --sink")

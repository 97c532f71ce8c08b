"""Servers for the tests: the embedded model served in-process on 127.0.0.1 and a free port."""

from __future__ import annotations

from talis_cli.generation import GenerationConfig
from talis_cli.server.run import BackgroundServer, load_served
from talis_cli.settings import RunSettings

GREEDY = GenerationConfig(temperature=0.0)


class LiveServer(BackgroundServer):
    """A BackgroundServer that also names its scheduler (tests watch `running`)."""

    @property
    def scheduler(self):
        return self.state.served.scheduler


def serve_embedded(config: GenerationConfig = GREEDY, max_batch: int = 8, max_queue: int = 64, **kwargs) -> LiveServer:
    """A LiveServer of the embedded model whose default settings are `config`."""
    return LiveServer(load_served(RunSettings(), config, max_batch, max_queue), **kwargs)


def metric_samples(text: str) -> dict:
    """Prometheus text -> {'name{labels}': value} (comments skipped)."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples

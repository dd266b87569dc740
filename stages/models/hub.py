"""The `hub` model source: a model config's published id (`hub_id: Qwen/Qwen1.5-7B-Chat`), fetched
through the normal Hugging Face cache (HF_HOME / HF_HUB_CACHE; HF_HUB_OFFLINE=1 uses only what is
cached) when `model.allow_hub=true`; otherwise a clear error says to set `model.path`.
`model.path` set wins over the source (the engine never asks a source then)."""
from __future__ import annotations

from medpipe.errors import ConfigError


class HubSource:
    def _check(self, opts: dict) -> str:
        hub_id = opts.get("hub_id")
        name = opts.get("name", "?")
        if not hub_id:
            raise ConfigError(f"model={name}: source hub needs model.hub_id (a published id such as "
                              f"Qwen/Qwen1.5-7B-Chat), or set model.path=/path/to/the/checkpoint")
        if not opts.get("allow_hub", False):
            raise ConfigError(f"model.path is required for model={name} (published as {hub_id}): set "
                              f"model.path=/path/to/the/checkpoint, or model.allow_hub=true to download "
                              f"{hub_id} into the Hugging Face cache")
        return str(hub_id)

    def materialize(self, opts: dict) -> str:
        """The local snapshot directory (downloaded once into the HF cache)."""
        hub_id = self._check(opts)
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        try:
            return snapshot_download(hub_id, revision=opts.get("revision"),
                                     allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py",
                                                     "*.tiktoken", "tokenizer*"])
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
            raise ConfigError(f"model.hub_id {hub_id}: cannot fetch it ({str(e).splitlines()[0]}); set "
                              f"model.path to a local copy") from None

    def identity(self, opts: dict) -> str:
        from medpipe.artifact import model_fingerprint

        return model_fingerprint(self.materialize(opts))

"""`spec.model.source` parsed: hf://org/name, pvc://claim/path, builtin://name (the runtime's
`ModelSource` is what `kubellm serve` then finds there)."""

from __future__ import annotations

from dataclasses import dataclass

MODELS_MOUNT = "/models"  # where a pvc:// claim is mounted, read-only


@dataclass(frozen=True)
class SourceURI:
    scheme: str  # "hf", "pvc" or "builtin"
    location: str  # hub id, path inside the claim, or built-in name
    claim: str | None = None

    @classmethod
    def parse(cls, uri: str) -> SourceURI:
        scheme, sep, rest = uri.partition("://")
        if not sep or not rest or scheme not in ("hf", "pvc", "builtin"):
            raise ValueError(
                f"model source {uri!r} must be hf://<org>/<name>, pvc://<claim>/<path> "
                f"or builtin://<name>"
            )
        if scheme == "pvc":
            claim, _, path = rest.partition("/")
            return cls(scheme, path, claim)
        return cls(scheme, rest)

    @property
    def downloads(self) -> bool:
        """Only hub models are fetched at start (into the cache PVC)."""
        return self.scheme == "hf"

    def runtime_model(self) -> str:
        """What `kubellm serve --model` gets."""
        if self.scheme == "pvc":
            return f"{MODELS_MOUNT}/{self.claim}/{self.location}".rstrip("/")
        return self.location

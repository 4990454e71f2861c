"""Where a runtime process is (recipes.spec.PHASES), kept by whichever mode runs: a failure reports it, so the
tuner picks the right fallback (an OOM in VAE decode wants tiling, one in denoise offload)."""

from __future__ import annotations

from typing import Any


class Phase:
    """The phase the run is in now; ``run_spec`` reads ``name`` when it turns a failure into a result."""

    def __init__(self) -> None:
        self.name = "start"

    def wrap(self, obj: Any, name: str, phase: str, then: str, before: Any = None) -> None:
        """Mark ``phase`` while ``obj.name`` runs (and ``then`` after it returns)."""
        original = getattr(obj, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.name = phase
            if before is not None:
                before()
            res = original(*args, **kwargs)
            self.name = then
            return res

        setattr(obj, name, wrapper)

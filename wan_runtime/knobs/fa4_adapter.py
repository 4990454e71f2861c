"""The module torch's FA4 glue imports in place of ``flash_attn.cute.interface`` (see flash_impl.py).

torch calls ``_flash_attn_fwd(...)`` and unpacks ``(out, lse)``; newer flash-attn-4 releases return more
values. Nothing is computed here: the call goes straight to flash-attn-4 and the extra values are dropped.
"""

from __future__ import annotations

from typing import Any

from flash_attn.cute import interface as _fa4


def _flash_attn_fwd(*args: Any, **kwargs: Any) -> Any:
    res = _fa4._flash_attn_fwd(*args, **kwargs)
    return tuple(res[:2]) if isinstance(res, tuple) and len(res) > 2 else res


_flash_attn_bwd = _fa4._flash_attn_bwd


def __getattr__(name: str) -> Any:  # anything else torch may look up comes from flash-attn-4 itself
    return getattr(_fa4, name)

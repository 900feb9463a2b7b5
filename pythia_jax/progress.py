"""An optional tqdm progress bar: `progress_bar(total, desc, enabled)`; disabled, a no-op."""

from __future__ import annotations


class _NullBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def progress_bar(total, desc: str, enabled: bool, **tqdm_kwargs):
    """A tqdm bar (imported only when enabled) or an object with the same update/close."""
    if enabled:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, **tqdm_kwargs)
    return _NullBar()

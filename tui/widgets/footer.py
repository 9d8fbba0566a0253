"""A Footer that rebuilds its keys only when the keys it shows change.

Textual's Footer recomposes (a fresh FooterKey widget per binding, each styled and data-bound) on every
bindings update, and bindings are updated on every screen switch and focus change even when the visible
keys stay the same. On a 2-core machine under training load that rebuild was a large share of the
key-to-paint time, so we skip it when nothing visible changed.
"""

from __future__ import annotations

from textual.widgets import Footer


class KeyFooter(Footer):
    _shown: tuple | None = None

    def _signature(self) -> tuple:
        return tuple((b.key, b.description, enabled, tooltip)
                     for (_, b, enabled, tooltip) in self.screen.active_bindings.values() if b.show)

    def bindings_changed(self, screen) -> None:
        if self.is_attached and screen is self.screen and screen.app.app_focus:
            signature = self._signature()
            if signature == self._shown:
                return
            self._shown = signature
        super().bindings_changed(screen)

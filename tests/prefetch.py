"""Fetch the providers' own clients before the suite enters its network namespace.

Inside the namespace no package registry is reachable, so ``make pytest`` runs this first:
``npm ci`` + esbuild for the browser SDKs (:mod:`tests.provider_js`) and a pinned, isolated
install of ``livekit-plugins-liveavatar`` (:mod:`tests.sim.test_liveavatar_plugin`). Both are
cached under ``.cache/``. Without a registry a developer's run goes on (those tests skip and
say why); in CI (``CI=true``) it is an error.
"""

from __future__ import annotations

import os
import sys

from tests.provider_js import BUNDLES, ProviderJsUnavailable, bundle
from tests.sim.test_liveavatar_plugin import PluginUnavailable, install


def main() -> int:
    try:
        for name in BUNDLES:
            bundle(name)
        install()
    except (ProviderJsUnavailable, PluginUnavailable) as exc:
        print(f"prefetch: {exc}", file=sys.stderr)
        return 1 if os.environ.get("CI") == "true" else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

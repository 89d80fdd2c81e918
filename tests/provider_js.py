"""The providers' own browser SDKs, installed from npm at test time and bundled for Chromium.

``tests/js/package.json`` and its lock pin ``@heygen/liveavatar-web-sdk``,
``@heygen/streaming-avatar`` (and through them ``livekit-client``) and ``esbuild``. The first
test that needs a bundle runs ``npm ci`` into ``.cache/provider-js/<lock digest>/`` and bundles
each SDK, unmodified, into one IIFE script that puts the package's exports on a global; later
runs reuse the cache. Nothing here is committed but the manifest and the lock.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "tests" / "js" / "package.json"
LOCK = ROOT / "tests" / "js" / "package-lock.json"
CACHE = Path(os.environ.get("AVATAR_GATEWAY_JS_CACHE", ROOT / ".cache" / "provider-js"))

BUNDLES: dict[str, tuple[str, str]] = {
    # name: (package, the global its exports land on)
    "liveavatar": ("@heygen/liveavatar-web-sdk", "LiveAvatarSDK"),
    "streaming-avatar": ("@heygen/streaming-avatar", "StreamingAvatarSDK"),
}

_lock = threading.Lock()


class ProviderJsUnavailable(RuntimeError):
    """npm or node is missing, or the install failed (the message says which)."""


def _workdir() -> Path:
    digest = hashlib.sha256(MANIFEST.read_bytes() + LOCK.read_bytes()).hexdigest()[:16]
    return CACHE / digest


def _install(work: Path) -> None:
    if (work / ".installed").exists():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise ProviderJsUnavailable("npm is not installed (apt-get install nodejs npm)")
    work.mkdir(parents=True, exist_ok=True)
    shutil.copy(MANIFEST, work / "package.json")
    shutil.copy(LOCK, work / "package-lock.json")
    done = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=work,
                          capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise ProviderJsUnavailable(f"npm ci failed: {done.stderr.strip()[-2000:]}")
    (work / ".installed").touch()


def bundle(name: str) -> Path:
    """The path of ``name``'s bundle (see :data:`BUNDLES`), built on first use."""
    package, global_name = BUNDLES[name]
    with _lock:
        work = _workdir()
        out = work / f"{name}.js"
        if out.exists():
            return out
        _install(work)
        entry = work / f"{name}.entry.js"
        entry.write_text(f'export * from "{package}";\n'
                         f'export {{ default }} from "{package}";\n' if name == "streaming-avatar"
                         else f'export * from "{package}";\n')
        esbuild = work / "node_modules" / ".bin" / "esbuild"
        done = subprocess.run(
            [str(esbuild), str(entry), "--bundle", "--format=iife", f"--global-name={global_name}",
             "--platform=browser", "--target=chrome120", f"--outfile={out}.tmp", "--log-level=error"],
            cwd=work, capture_output=True, text=True, timeout=300, check=False)
        if done.returncode != 0:
            raise ProviderJsUnavailable(f"esbuild failed for {package}: {done.stderr.strip()[-2000:]}")
        Path(f"{out}.tmp").rename(out)
        return out


def installed_file(package: str, path: str) -> Path:
    """A file of an installed package (``npm ci`` on first use), e.g. livekit-client's UMD
    build, which a page can load as it is."""
    with _lock:
        work = _workdir()
        _install(work)
    found = work / "node_modules" / package / path
    if not found.is_file():
        raise ProviderJsUnavailable(f"{package} has no {path}")
    return found


def installed_version(package: str) -> str:
    """The version npm installed (tests assert the pin they believe in)."""
    import json

    work = _workdir()
    manifest = work / "node_modules" / package / "package.json"
    return str(json.loads(manifest.read_text())["version"])

"""Where stores live when the user names a checkpoint instead of a store: converted once, reused after."""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path

from .store import STORE_JSON, Store


def is_hub_id(spec: str) -> bool:
    """'org/name' as the Hugging Face hub spells repositories (and no local path exists by that name)."""
    return re.fullmatch(r"[\w.-]+/[\w.-]+", spec) is not None and not Path(spec).expanduser().exists()


def home() -> Path:
    """moestream's own cache folder: $MOESTREAM_HOME, else $XDG_CACHE_HOME/moestream, else ~/.cache/moestream."""
    if os.environ.get("MOESTREAM_HOME"):
        return Path(os.environ["MOESTREAM_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moestream"


def store_path_for(src: str) -> Path:
    """A stable store location for a checkpoint directory or hub id."""
    p = Path(src).expanduser()
    ident = str(p.resolve()) if p.exists() else src
    name = re.sub(r"[^\w.-]+", "--", p.name if p.exists() else src).strip("-")
    return home() / "stores" / f"{name}-{hashlib.sha1(ident.encode()).hexdigest()[:10]}"


def ensure_store(src: str, progress: bool = True) -> Store:
    """Open `src` if it is a store; otherwise convert it (once) into the store cache and open that."""
    if (Path(src).expanduser() / STORE_JSON).is_file():
        return Store.open(Path(src).expanduser())
    from .convert import convert

    out = store_path_for(src)
    if (out / STORE_JSON).is_file():
        return Store.open(out)
    if progress:
        print(f"converting {src} into {out} (once)", file=sys.stderr, flush=True)
    convert(src, out, progress=progress)
    return Store.open(out)

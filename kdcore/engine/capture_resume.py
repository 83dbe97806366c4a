"""What ``kdcore capture`` finds at ``--out`` and keeps: an existing store of the same
capture is continued (an interrupted capture finished, a damaged one repaired), another
capture's store or other files are refused, and the manifest a capture works from records
the digests of the shards it keeps (docs/signals.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdcore.common.errors import ConfigError, RunFailure
from kdcore.signals import store


class CaptureStopped(RunFailure):
    """A capture that failed part way (exit 1): the shards it finished are kept, and the
    message says to run the same command again to continue."""


#: manifest entries that must agree for a capture to continue into an existing store
_SAME = ("kind", "k", "num_classes", "temperature", "target_shape", "positions", "n", "shard_samples", "shards",
         "layout", "data", "teacher", "fixed_view", store.DROPS, "sample_seed")
#: what a manifest written before an entry existed means by its absence
_ABSENT = {"kind": "top_k", store.DROPS: False, "sample_seed": None}


def check_existing(root: Path, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The store already at ``root`` (None: none), refused where it is another capture."""
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--out: {root} exists and is not a directory")
    existing = store.read_manifest(root, "--out") if root.is_dir() else None
    if existing is None:
        if root.is_dir() and any(root.iterdir()):
            raise ConfigError(f"--out: {root} exists and holds files but no teacher store; choose another --out")
        return None
    for key in _SAME:
        if existing.get(key, _ABSENT.get(key)) != manifest[key]:
            raise ConfigError(f"--out: {root} holds a capture with another {key!r} (of another teacher, data "
                              "or settings); choose another --out, or delete it to capture again")
    return existing


def good_shards(root: Path, existing: dict[str, Any], quiet: bool) -> dict[str, str]:
    """The shards of the store at ``root`` that are whole, by name, with their SHA-256: present,
    of the right size and with the digest the manifest records. A shard it records none for was
    written whole (atomically) by a capture interrupted before its end, and is kept; in a
    complete store (of kdcore 0.1) it must pass the value checks, record by record. The others
    are listed on the output (unless ``quiet``)."""
    recorded = existing.get(store.DIGESTS) or {}
    reader = store.StoreReader(root, existing)
    good, bad = {}, []
    for j in range(int(existing["shards"])):
        name = store.shard_name(j)
        problem = store.size_problem(root, j, existing)
        if problem is None:
            digest = store.file_sha256(root / name)
            if name in recorded and digest != recorded[name]:
                problem = "its SHA-256 differs from the one in manifest.json"
            elif name not in recorded and existing.get("complete"):
                try:
                    reader.check_shard(j)
                except store.DamagedStore:
                    problem = "it holds damaged records"
        if problem is None:
            good[name] = digest
        elif problem != "is missing" or existing.get("complete"):
            bad.append(f"{name} ({problem.removeprefix('is ')})")
    if bad and not quiet:
        print(f"capture: rewriting {len(bad)} damaged or missing shard(s) of {root}: {', '.join(bad[:5])}"
              f"{' ...' if len(bad) > 5 else ''}")
    return good


def drops_ignored(root: Path) -> bool:
    """Whether a token-level capture into ``root`` leaves out positions whose target is -100:
    yes, unless ``root`` holds a store written before that (every position stored), which a
    capture finishes or repairs in its own format."""
    existing = store.read_manifest(root, "--out") if (root / store.MANIFEST).is_file() else None
    return existing is None or bool(existing.get(store.DROPS))


def start(root: Path, manifest: dict[str, Any], quiet: bool) -> None:
    """Check what ``--out`` holds and write the manifest the capture works from: ``complete``
    where the store there is whole, else incomplete with the digests of the shards to keep."""
    existing = check_existing(root, manifest)
    if existing is None:
        store.write_manifest(root, manifest)
        return
    good = good_shards(root, existing, quiet)
    if existing.get("complete") and len(good) == manifest["shards"]:
        if existing.get(store.DIGESTS) != good:  # a store of kdcore 0.1: its digests recorded now
            store.write_manifest(root, {store.CAPTURE_ARGS: manifest[store.CAPTURE_ARGS], **existing,
                                        store.DIGESTS: good})
        return
    store.remove_partial(root)  # what a killed capture was writing
    store.write_manifest(root, {**manifest, store.DIGESTS: good})


def all_digests(root: Path, manifest: dict[str, Any], known: dict[str, str]) -> dict[str, str]:
    """Every shard's SHA-256: ``known`` (kept or written by this rank), the others' (written by
    other ranks) from their files."""
    digests = dict(known)
    for j in range(manifest["shards"]):
        name = store.shard_name(j)
        if name not in digests:
            problem = store.size_problem(root, j, manifest)
            if problem is not None:
                raise CaptureStopped(f"capture: {store.describe_shard(root, j, manifest)} {problem} although every "
                                     "rank finished; run the same kdcore capture command again to continue")
            digests[name] = store.file_sha256(root / name)
    return dict(sorted(digests.items()))



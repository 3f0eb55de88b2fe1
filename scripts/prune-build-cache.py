#!/usr/bin/env python3
"""Removes this workspace's stale build output from the shared build cache.

Every fresh clone (CI) is at a new path, and cargo hashes the path into the names of the workspace's
own artifacts, so each run adds a new copy of every test binary (about 260 MB each in debug) and the
cache grows by gigabytes per run until the disk is full. Dependencies are not affected: their names
do not depend on the clone.

Reads cargo's JSON messages (`cargo build --message-format=json ...`) on stdin and deletes, in the
profile directory given, every artifact of the workspace's targets (the `--names` given) whose hash
is not one the build just reported; and, for the same names, incremental-compilation state unused for
a day. Prints what it freed.

Usage: cargo build --all-targets --message-format=json | prune-build-cache.py TARGET/debug NAME...
"""

import json
import os
import re
import shutil
import sys
import time


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    profile_dir, names = sys.argv[1], set(sys.argv[2:])
    keep = set()
    linked = set()
    for line in sys.stdin:
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("reason") != "compiler-artifact":
            continue
        for f in (msg.get("filenames") or []) + [msg.get("executable") or ""]:
            m = re.search(r"-([0-9a-f]{16})(\.[a-z]+)?$", os.path.basename(f))
            if m:
                keep.add(m.group(1))
            elif f and os.path.exists(f):
                # A binary is reported by its uplifted copy (target/debug/NAME), a hard link to the
                # hashed file in deps.
                linked.add(os.stat(f).st_ino)
    if not keep:
        print("prune-build-cache: cargo reported no artifacts; nothing removed", file=sys.stderr)
        return 0
    freed = 0
    pattern = re.compile(r"^(?:lib)?(.+)-([0-9a-f]{16})(?:\.[a-z]+)?$")
    deps = os.path.join(profile_dir, "deps")
    ours = []
    for entry in os.scandir(deps) if os.path.isdir(deps) else []:
        m = pattern.match(entry.name)
        if m and m.group(1).replace("-", "_") in names:
            ours.append((entry, m.group(2)))
            if entry.stat(follow_symlinks=False).st_ino in linked:
                keep.add(m.group(2))
    for entry, digest in ours:
        if digest not in keep:
            freed += entry.stat(follow_symlinks=False).st_size
            os.remove(entry.path)
    # Incremental state is kept per compilation unit under names that do not say which build it
    # belongs to; CI builds without it (CARGO_INCREMENTAL=0), so what is left is a developer's: kept
    # while it is used, removed after a day without use.
    incremental = os.path.join(profile_dir, "incremental")
    cutoff = time.time() - 24 * 3600
    for entry in os.scandir(incremental) if os.path.isdir(incremental) else []:
        m = re.match(r"^(.+)-[0-9a-z]+$", entry.name)
        if not m or m.group(1) not in names or entry.stat().st_mtime > cutoff:
            continue
        for root, _, files in os.walk(entry.path):
            for f in files:
                try:
                    freed += os.path.getsize(os.path.join(root, f))
                except OSError:
                    pass
        shutil.rmtree(entry.path, ignore_errors=True)
    print(f"prune-build-cache: freed {freed / 2**30:.1f} GiB of stale build output in {profile_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

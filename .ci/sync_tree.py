"""Mirror the repository's files (tracked, plus untracked ones git does not ignore) into a cached build tree.

    python .ci/sync_tree.py SRC DST

A file is rewritten only when its content changed, so the ninja build kept in DST (build/) recompiles only the
sources that changed even though a fresh CI clone gives every file a new mtime. Files that left the repository are
deleted from DST; ignored build outputs there (build/, *.so) are kept.
"""

import filecmp
import os
import shutil
import subprocess
import sys

MANIFEST = ".uxnet-synced-files"


def repo_files(src: str) -> list:
    out = subprocess.run(["git", "-C", src, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         check=True, capture_output=True).stdout
    return sorted({f for f in out.decode().split("\0") if f and os.path.isfile(os.path.join(src, f))})


def sync(src: str, dst: str) -> int:
    files = repo_files(src)
    manifest = os.path.join(dst, MANIFEST)
    previous = set()
    if os.path.exists(manifest):
        with open(manifest) as f:
            previous = set(f.read().splitlines())
    changed = 0
    for rel in files:
        s, d = os.path.join(src, rel), os.path.join(dst, rel)
        if os.path.isfile(d) and filecmp.cmp(s, d, shallow=False):
            continue
        os.makedirs(os.path.dirname(d), exist_ok=True)
        shutil.copy2(s, d)
        changed += 1
    for rel in previous - set(files):
        if os.path.isfile(os.path.join(dst, rel)):
            os.unlink(os.path.join(dst, rel))
    with open(manifest, "w") as f:
        f.write("\n".join(files))
    return changed


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    n = sync(sys.argv[1], sys.argv[2])
    print(f"sync_tree: {n} file(s) updated in {sys.argv[2]}")

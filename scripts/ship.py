"""Move a large file to the GPU machine in pieces, and put it back together there.

A device call carries at most 64 MiB of working tree, and files written outside the repository survive
on the machine only while it stays warm between back-to-back calls. So a model (or any file) travels
as numbered parts of at most `--part-mib` MiB, one call each, into a directory outside the repo, and
the last call assembles them and checks the whole file's size and sha256 before anything reads it:

    python3 scripts/ship.py split FILE --out .ship/NAME            # here: parts + manifest.json
    # each device call carries `.ship/NAME/manifest.json` and one part, and runs
    python3 scripts/ship.py stash .ship/NAME --into /tmp/ship/NAME  # there: keep the part outside the repo
    # the last call, after stashing its own part:
    python3 scripts/ship.py assemble /tmp/ship/NAME --to /tmp/work/FILE

`assemble` refuses (one line, exit 2, nothing written) when a part is missing or the result's size
or sha256 differs from the manifest. Standard library only: the GPU machine has no extra packages.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def split(src: Path, out: Path, part_mib: int) -> dict:
    """Write `out/part-NNN` (each ≤ part_mib MiB) and `out/manifest.json` (name, size, sha256, parts)."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("part-*"):
        old.unlink()
    size, step, parts = src.stat().st_size, part_mib << 20, []
    with src.open("rb") as f:
        for k in range((size + step - 1) // step):
            name = f"part-{k:03d}"
            (out / name).write_bytes(f.read(step))
            parts.append({"name": name, "sha256": _sha256(out / name)})
    manifest = {"name": src.name, "size": size, "sha256": _sha256(src), "parts": parts}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def stash(src: Path, into: Path) -> list[str]:
    """Copy the manifest and whatever parts `src` holds into `into` (outside the repo); returns the names."""
    into.mkdir(parents=True, exist_ok=True)
    names = []
    for p in sorted(src.iterdir()):
        if p.name == MANIFEST or p.name.startswith("part-"):
            shutil.copyfile(p, into / p.name)
            names.append(p.name)
    return names


def assemble(parts_dir: Path, target: Path) -> Path:
    """Concatenate the parts in order into `target` after checking each, then the whole; atomic."""
    manifest = json.loads((parts_dir / MANIFEST).read_text())
    missing = [p["name"] for p in manifest["parts"] if not (parts_dir / p["name"]).is_file()]
    if missing:
        raise SystemExit(f"ship: {manifest['name']}: parts missing in {parts_dir}: {', '.join(missing)}")
    for p in manifest["parts"]:
        if _sha256(parts_dir / p["name"]) != p["sha256"]:
            raise SystemExit(f"ship: {manifest['name']}: {p['name']} has the wrong sha256 (damaged in transfer)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    with tmp.open("wb") as out:
        for p in manifest["parts"]:
            with (parts_dir / p["name"]).open("rb") as f:
                shutil.copyfileobj(f, out)
    size, digest = tmp.stat().st_size, _sha256(tmp)
    if size != manifest["size"] or digest != manifest["sha256"]:
        tmp.unlink()
        raise SystemExit(
            f"ship: {manifest['name']}: assembled {size} B sha256 {digest[:12]}…, "
            f"expected {manifest['size']} B {manifest['sha256'][:12]}…"
        )
    os.replace(tmp, target)
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("split")
    a.add_argument("file", type=Path)
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--part-mib", type=int, default=60)
    b = sub.add_parser("stash")
    b.add_argument("src", type=Path)
    b.add_argument("--into", type=Path, required=True)
    c = sub.add_parser("assemble")
    c.add_argument("parts", type=Path)
    c.add_argument("--to", type=Path, required=True)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "split":
            m = split(args.file, args.out, args.part_mib)
            print(f"ship: {m['name']} {m['size']} B -> {len(m['parts'])} parts in {args.out}")
        elif args.cmd == "stash":
            print(f"ship: stashed {', '.join(stash(args.src, args.into))} in {args.into}")
        else:
            print(f"ship: assembled {assemble(args.parts, args.to)}")
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

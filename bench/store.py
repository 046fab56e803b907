"""Content-addressed artifact store: one folder per stage key, published atomically.

A stage computes into ``<root>/<kind>/.tmp-<key>-<pid>/`` and, once ``done.json`` is written inside it,
the folder is renamed to ``<root>/<kind>/<key>``. A folder without ``done.json`` never exists under its
final name, so a killed run leaves only temp folders, which the next run deletes.

``done.json`` lists every file of the artifact with its size and sha256 (``files``). ``verify`` checks them: cheaply
(sizes, and the hashes of files under ``SMALL_FILE`` bytes: values, prompts, logs, configs) or fully (every hash:
weights and images). A damaged artifact is ``discard``-ed and recomputed, never used.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any


SMALL_FILE = 1 << 20  # bytes: hashed on every cheap verification


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_manifest(folder: Path) -> dict[str, list]:
    """{relative path: [size, sha256]} of every file under ``folder`` except ``done.json``."""
    return {f.relative_to(folder).as_posix(): [f.stat().st_size, file_sha256(f)]
            for f in sorted(folder.rglob("*")) if f.is_file() and f.name != "done.json"}


def stable_hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=str))


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:24]

    def is_done(self, kind: str, key: str) -> bool:
        """Finished and its artifact still complete (not pruned)."""
        path = self.path(kind, key)
        return (path / "done.json").is_file() and not (path / "pruned").exists()

    def is_pruned(self, kind: str, key: str) -> bool:
        return (self.path(kind, key) / "pruned").exists()

    def prune(self, kind: str, key: str, big: str) -> None:
        """Delete a finished stage's big artifact (e.g. full fine-tuned weights) once its consumers are done; the
        record stays for provenance and the stage counts as missing if something needs it again. The marker names
        the deleted folder (its files are no longer verified)."""
        path = self.path(kind, key)
        (path / "pruned").write_text(f"{big}\n")
        shutil.rmtree(path / big, ignore_errors=True)

    def record(self, kind: str, key: str) -> dict:
        return json.loads((self.path(kind, key) / "done.json").read_text())

    def verify(self, kind: str, key: str, full: bool = False) -> str | None:
        """None if the finished artifact matches its record, else what is wrong (naming the file). ``full`` hashes
        every file; otherwise sizes, and hashes of files under SMALL_FILE bytes. Records written before files were
        listed verify as far as they can (their done.json must still parse)."""
        path = self.path(kind, key)
        try:
            rec = self.record(kind, key)
        except (OSError, ValueError) as e:
            return f"{path / 'done.json'}: unreadable record ({e})"
        pruned = path / "pruned"
        skip = pruned.read_text().strip() + "/" if pruned.is_file() else None
        for rel, (size, digest) in sorted(rec.get("files", {}).items()):
            if skip and rel.startswith(skip):
                continue
            f = path / rel
            if not f.is_file():
                return f"{f}: missing"
            if f.stat().st_size != size:
                return f"{f}: {f.stat().st_size} bytes, recorded {size}"
            if (full or size < SMALL_FILE) and file_sha256(f) != digest:
                return f"{f}: content differs from its recorded sha256"
        return None

    def discard(self, kind: str, key: str) -> None:
        """Remove a (damaged) artifact so that it is recomputed."""
        path = self.path(kind, key)
        if path.exists():
            trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def finished(self) -> list[tuple[str, str]]:
        """(kind, folder name) of every finished artifact under the root."""
        if not self.root.is_dir():
            return []
        return sorted((d.parent.name, d.name) for d in self.root.glob("*/*") if (d / "done.json").is_file())

    def begin(self, kind: str, key: str) -> Path:
        tmp = self.root / kind / f".tmp-{key[:24]}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, kind: str, key: str, tmp: Path, record: dict) -> None:
        record = {**record, "files": file_manifest(tmp)}
        atomic_write_json(tmp / "done.json", record)
        final = self.path(kind, key)
        if final.exists() and not (final / "pruned").exists():  # finished elsewhere meanwhile (same content)
            shutil.rmtree(tmp)
            return
        if final.exists():  # recomputing a pruned artifact: swap the complete folder in
            trash = final.with_name(f".trash-{final.name}-{os.getpid()}")
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
            return
        os.rename(tmp, final)

    def abort(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    def clean_temps(self) -> int:
        n = 0
        if self.root.is_dir():
            for kind_dir in self.root.iterdir():
                if kind_dir.is_dir():
                    for tmp in [*kind_dir.glob(".tmp-*"), *kind_dir.glob(".trash-*")]:
                        shutil.rmtree(tmp, ignore_errors=True)
                        n += 1
        return n

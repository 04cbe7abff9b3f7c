"""Typed artifacts on disk: atomic writes, provenance, content hashes, clear read errors.

Every stage writes JSON/YAML a person can open. A write goes to a temp file in the same directory
and is renamed into place, so an interrupted run never leaves half a file. Re-running a stage with
the same inputs is detected by content hash; a *different* existing result is never silently
overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import stat
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from conceptfix.errors import ConceptfixError

T = TypeVar("T", bound=BaseModel)

_VERSIONED_PACKAGES = ("conceptfix", "torch", "transformers", "accelerate", "peft", "safetensors", "gguf")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def provenance(stage: str, config: dict[str, Any] | BaseModel | None = None) -> dict[str, Any]:
    """What produced an artifact: stage, resolved config, package versions, UTC time."""
    if isinstance(config, BaseModel):
        config = config.model_dump(mode="json")
    return {
        "stage": stage,
        "config": config or {},
        "versions": package_versions(),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def content_hash(obj: Any) -> str:
    """Stable sha256 of a JSON-serialisable object (key order does not matter)."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc), else set-and-restore."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def default_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file: 0o666 minus the umask."""
    return 0o666 & ~current_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write via a temp file + rename. The result has the permissions a normal write would give it:
    an existing file keeps its mode, a new one gets 0o666 & ~umask (mkstemp alone would leave 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = default_file_mode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, ensure_ascii=False) + "\n")


def write_yaml(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, yaml.safe_dump(to_jsonable(obj), sort_keys=False, allow_unicode=True))


def read_json(path: str | os.PathLike, *, field: str = "input") -> Any:
    path = Path(path)
    if not path.exists():
        raise ConceptfixError(f"file not found: {path}", field=field)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConceptfixError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})", field=field
        ) from None
    except UnicodeDecodeError:
        raise ConceptfixError(f"{path} is not UTF-8 text", field=field) from None


def read_yaml(path: str | os.PathLike, *, field: str = "config") -> Any:
    path = Path(path)
    if not path.exists():
        raise ConceptfixError(f"file not found: {path}", field=field)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ConceptfixError(f"{path} is not valid YAML{where}: {problem}", field=field) from None


def validation_message(exc: ValidationError, *, prefix: str = "") -> ConceptfixError:
    """Turn the first pydantic error into one line naming the field."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    field = f"{prefix}{loc}" if loc else (prefix.rstrip(".") or None)
    return ConceptfixError(err.get("msg", "invalid value"), field=field)


def parse_model(model_cls: type[T], data: Any, *, prefix: str = "") -> T:
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise validation_message(exc, prefix=prefix) from None


def write_artifact(path: str | os.PathLike, obj: Any, *, overwrite: bool = False) -> Path:
    """Write a JSON artifact unless a *different* result is already there.

    Identical content (ignoring the `provenance.created_utc` stamp) is a no-op; different content needs
    `overwrite=True`, so a re-run never silently replaces someone's earlier result.
    """
    path = Path(path)
    new = to_jsonable(obj)
    if path.exists() and not overwrite:
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = None
        if _strip_volatile(old) == _strip_volatile(new):
            return path
        raise ConceptfixError(
            f"{path} already holds a different result", field="output", hint="choose another path or pass --overwrite"
        )
    return write_json(path, new)


def _strip_volatile(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_volatile(v) for k, v in obj.items() if k not in ("created_utc",)}
    if isinstance(obj, list):
        return [_strip_volatile(v) for v in obj]
    return obj

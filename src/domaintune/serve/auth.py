"""API keys: stored as SHA-256 hashes, each scoped to the models it may call and limited to a
number of requests per minute.

The keys file (YAML or JSON)::

    keys:
      - name: support-bot                 # shows in logs and metrics, never the key
        sha256: 5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8
        models: ["support-*"]             # shell-style patterns; "*" for every model
        rate_limit_per_minute: 120        # optional; no limit without it

``python -m domaintune.serve.auth NAME [MODEL ...] [--rate-limit N]`` makes a new random key and
prints it once, with the entry to add under the file's ``keys:``. Every entry goes under one
``keys:``: a second ``keys:`` is refused, not read as YAML reads it (replacing the first).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from domaintune.errors import DomaintuneError
from domaintune.serve.errors import ApiError


def hash_key(key: str) -> str:
    """The hex SHA-256 of ``key``: what the keys file stores."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class _KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    models: list[str] = Field(min_length=1)
    rate_limit_per_minute: int | None = Field(default=None, gt=0)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping, which ``yaml.safe_load`` reads as the
    last one: two pasted entries, each under its own ``keys:``, would silently leave one key."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        mapping = super().construct_mapping(node, deep=deep)  # checks first that every key can be one
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.YAMLError(f"line {key_node.start_mark.line + 1}: {key!r} is given twice in one mapping, "
                                     "and the second would replace the first; list every key under a single keys:")
            seen.add(key)
        return mapping


class _KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[_KeyEntry]


@dataclass
class ApiKey:
    """A caller: its name, the model patterns it may call, its rate limit (a token bucket)."""

    name: str
    models: list[str]
    rate_limit_per_minute: int | None = None
    _tokens: float = field(default=0.0, repr=False)
    _refilled: float = field(default_factory=time.monotonic, repr=False)

    def __post_init__(self) -> None:
        self._tokens = float(self.rate_limit_per_minute or 0)

    def may_call(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)

    def take(self) -> float | None:
        """Count one request; None if allowed, else the seconds until the next one is."""
        if self.rate_limit_per_minute is None:
            return None
        now = time.monotonic()
        per_second = self.rate_limit_per_minute / 60
        self._tokens = min(self.rate_limit_per_minute, self._tokens + (now - self._refilled) * per_second)
        self._refilled = now
        if self._tokens >= 1:
            self._tokens -= 1
            return None
        return (1 - self._tokens) / per_second


class KeyRing:
    """The keys a server accepts; ``KeyRing(None)`` accepts every request (no auth)."""

    def __init__(self, keys: list[ApiKey] | None, hashes: list[str] | None = None):
        self.enabled = keys is not None
        self._by_hash = dict(zip(hashes or [], keys or []))

    @classmethod
    def from_file(cls, path: Path) -> KeyRing:
        """Read a keys file; a malformed one raises ``DomaintuneError`` naming the problem."""
        try:
            text = Path(path).read_text(encoding="utf-8")
            raw = json.loads(text) if Path(path).suffix == ".json" else yaml.load(text, Loader=_UniqueKeyLoader)
            parsed = _KeysFile.model_validate(raw)
        except OSError as exc:
            raise DomaintuneError(f"cannot read the keys file: {exc.strerror}", where=str(path)) from None
        except (ValueError, yaml.YAMLError) as exc:
            first = exc.errors()[0] if isinstance(exc, ValidationError) else None
            detail = f"{'.'.join(map(str, first['loc']))}: {first['msg']}" if first else str(exc).splitlines()[0]
            raise DomaintuneError(f"invalid keys file ({detail})", where=str(path),
                                  hint="see `python -m domaintune.serve.auth --help` for the format") from None
        names = [k.name for k in parsed.keys]
        if len(set(names)) != len(names) or len({k.sha256 for k in parsed.keys}) != len(names):
            raise DomaintuneError("two keys share a name or a hash", where=str(path))
        keys = [ApiKey(k.name, k.models, k.rate_limit_per_minute) for k in parsed.keys]
        return cls(keys, [k.sha256 for k in parsed.keys])

    def authenticate(self, authorization: str | None) -> ApiKey | None:
        """The key in an ``Authorization: Bearer ...`` header, rate limit counted.

        Raises ``ApiError`` 401 for a missing or unknown key and 429 past its rate limit."""
        if not self.enabled:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        key = self._by_hash.get(hash_key(token.strip())) if scheme.lower() == "bearer" and token.strip() else None
        if key is None:
            raise ApiError(401, "missing or invalid API key; send it as 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        wait = key.take()
        if wait is not None:
            raise ApiError(429, f"rate limit of {key.rate_limit_per_minute} requests per minute reached for key "
                           f"{key.name!r}", code="rate_limit_exceeded", headers={"Retry-After": str(int(wait) + 1)})
        return key


def check_scope(key: ApiKey | None, model: str) -> None:
    """Raise ``ApiError`` 403 when ``key`` may not call ``model``."""
    if key is not None and not key.may_call(model):
        raise ApiError(403, f"this API key may not call model {model!r}", code="model_not_allowed", param="model")


def _positive(text: str) -> int:
    import argparse

    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of requests, 1 or more")
    return int(text)


def main(argv: list[str]) -> int:
    """Print a new key and its keys-file entry."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m domaintune.serve.auth",
                                     description="Make a new API key and print it with its keys-file entry.")
    parser.add_argument("name", help="the key's name, shown in logs, metrics and feedback records")
    parser.add_argument("models", nargs="*", help="model names or shell-style patterns it may call (default: all, '*')")
    parser.add_argument("--rate-limit", type=_positive, metavar="N", help="requests per minute (default: no limit)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    key = "dt-" + secrets.token_urlsafe(32)
    entry = {"name": args.name, "sha256": hash_key(key), "models": args.models or ["*"]}
    if args.rate_limit is not None:
        entry["rate_limit_per_minute"] = args.rate_limit
    print(f"key (shown once, give it to the caller): {key}")
    if not args.models:
        print("it may call every model: name models after the key's name to restrict it")
    # the entry alone, not under its own `keys:`: pasted twice, that would leave only the second
    print("entry to add under `keys:` in the keys file (a new file starts with the line `keys:`):")
    print(yaml.safe_dump([entry], sort_keys=False).rstrip())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))

"""HEALTHCHECK and ONBUILD: instructions that change only the image config, as Docker
records them (its config fields `Healthcheck` and `OnBuild`, kept in the OCI config
beside the standard ones, as Docker and BuildKit write them).

- `HEALTHCHECK NONE` disables a check the base image had: `{"Test": ["NONE"]}`.
  `HEALTHCHECK [--interval=D] [--timeout=D] [--start-period=D] [--start-interval=D]
  [--retries=N] CMD command`: `Test` is `["CMD", ...]` for the exec form (a JSON array),
  `["CMD-SHELL", "command"]` for the shell form; the durations are Go's (`30s`, `1m30s`,
  `500ms`, `1h`), stored in nanoseconds, none below 1ms (0 means Docker's default and
  is left out, as are 0 retries).
- `ONBUILD INSTRUCTION` appends the instruction's text to `OnBuild`. A later build whose
  FROM is this image (a tag, a layer, an image pulled from a registry, or an earlier
  stage) runs those triggers first, in order, as if written right after its FROM; the
  new image does not keep them (Docker's rule: triggers run for children, not
  grandchildren). `ONBUILD ONBUILD`, `ONBUILD FROM` and `ONBUILD MAINTAINER` are refused
  at parse time, as Docker refuses them.
"""

from __future__ import annotations

import json
import re

from ..errors import InvalidArgument

HEALTHCHECK_FLAGS = {"interval", "timeout", "start-period", "start-interval", "retries"}
_DURATION_FIELDS = (("interval", "Interval"), ("timeout", "Timeout"),
                    ("start-period", "StartPeriod"), ("start-interval", "StartInterval"))
_UNITS = {"ns": 1, "us": 10**3, "µs": 10**3, "μs": 10**3, "ms": 10**6, "s": 10**9,
          "m": 60 * 10**9, "h": 3600 * 10**9}
_PART = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|µs|μs|ms|s|m|h)")
NOT_TRIGGERS = {"ONBUILD": "chaining ONBUILD via `ONBUILD ONBUILD` is not allowed",
                "FROM": "FROM is not allowed as an ONBUILD trigger",
                "MAINTAINER": "MAINTAINER is not allowed as an ONBUILD trigger"}
MIN_DURATION_NS = 10**6


def parse_duration(text: str) -> int:
    """A Go duration (`1m30s`, `0.5s`, `250ms`, `0`) in nanoseconds; InvalidArgument if
    it is not one or is negative."""
    s = text.strip()
    if s in ("0", "+0"):
        return 0
    if s.startswith("-"):
        raise InvalidArgument(f"{text!r} is negative")
    s = s.removeprefix("+")
    total, pos = 0.0, 0
    if not s:
        raise InvalidArgument(f"{text!r} is not a duration (e.g. 30s, 1m30s, 500ms)")
    while pos < len(s):
        m = _PART.match(s, pos)
        if m is None or m.group(1) in ("", "."):
            raise InvalidArgument(f"{text!r} is not a duration (e.g. 30s, 1m30s, 500ms)")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    return int(round(total))


def healthcheck(text: str, flags: dict[str, str]) -> dict:
    """The config's `Healthcheck` object for HEALTHCHECK's arguments `text` and its
    flags; InvalidArgument saying what is wrong."""
    words = text.split(None, 1)
    kind = words[0].upper() if words else ""
    rest = words[1].strip() if len(words) > 1 else ""
    if kind == "NONE":
        if rest:
            raise InvalidArgument("HEALTHCHECK NONE takes no arguments")
        return {"Test": ["NONE"]}
    if kind != "CMD":
        raise InvalidArgument(f"unknown type {words[0] if words else ''!r} (NONE, or CMD "
                              "and a command)")
    test: list[str] | None = None
    if rest.startswith("["):
        try:
            value = json.loads(rest)
        except ValueError:
            value = None
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            test = ["CMD", *value]
    if test is None:
        test = ["CMD-SHELL", rest] if rest else ["CMD"]
    if len(test) == 1:
        raise InvalidArgument("missing command after HEALTHCHECK CMD")
    out: dict = {"Test": test}
    for flag, name in _DURATION_FIELDS:
        if flag not in flags:
            continue
        try:
            ns = parse_duration(flags[flag])
        except InvalidArgument as e:
            raise InvalidArgument(f"--{flag}: {e}") from None
        if 0 < ns < MIN_DURATION_NS:
            raise InvalidArgument(f"--{flag}={flags[flag]} cannot be less than 1ms")
        if ns:
            out[name] = ns
    if "retries" in flags:
        try:
            retries = int(flags["retries"])
        except ValueError:
            raise InvalidArgument(f"--retries={flags['retries']}: not a number") from None
        if retries < 0:
            raise InvalidArgument(f"--retries cannot be negative ({retries})")
        if retries:
            out["Retries"] = retries
    return out


def trigger_refused(keyword: str) -> str | None:
    """Why `ONBUILD keyword ...` is refused, or None."""
    return NOT_TRIGGERS.get(keyword.upper())


def take_triggers(config: dict) -> list[str]:
    """The base image's ONBUILD triggers, removed from the config the new image starts
    from (they run for this build only)."""
    triggers = config.pop("OnBuild", None)
    if not isinstance(triggers, list):
        return []
    return [t for t in triggers if isinstance(t, str) and t.strip()]


__all__ = ["HEALTHCHECK_FLAGS", "healthcheck", "parse_duration", "take_triggers",
           "trigger_refused"]

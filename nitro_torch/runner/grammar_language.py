"""Does a grammar admit any finite output? Read from xgrammar's own normalized EBNF (str(grammar)).

A schema such as {"$ref": "#"}, or an object that requires a property of its own type, compiles to rules that
only ever expand into themselves (`root ::= ((root))`): no token is ever allowed, so generation could only end
in a rejected token. A rule is productive when one of its alternatives is a sequence of productive items;
strings, character classes, "" and items repeated zero or more times are productive. Constructs this reader
does not know (TagDispatch, future syntax) count as productive, so it never rejects a grammar by mistake.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_RULE_START = re.compile(r"^([A-Za-z_][\w.\-]*) ::= ", re.MULTILINE)
_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<chars>\[(?:[^\]\\]|\\.)*\])
  | (?P<lookahead>\(=)
  | (?P<open>\()
  | (?P<close>\))
  | (?P<bar>\|)
  | (?P<repeat>\{\s*(?P<low>-?\d+)\s*(?:,\s*-?\d+\s*)?\}|[*?+])
  | (?P<name>[A-Za-z_][\w.\-]*)
""", re.VERBOSE)


class _Opaque(Exception):
    """A rule body this reader does not understand."""


@dataclass
class _Rule:
    alternatives: list[list[str]] = field(default_factory=list)
    """Each alternative: the rule names it needs (terminals and optional items need none)."""
    opaque: bool = False


def admits_finite_output(ebnf: str, root: str = "root") -> bool:
    """False only when `root` cannot derive any finite string (every derivation recurses forever)."""
    rules = _read_rules(ebnf)
    if root not in rules:
        return True
    # Linear-time fixed point: each alternative counts the rules it still waits for.
    waiting: list[int] = []
    owner: list[str] = []
    needed_by: dict[str, list[int]] = {}
    ready = [name for name, rule in rules.items() if rule.opaque]
    for name, rule in rules.items():
        for alternative in rule.alternatives:
            needs = {need for need in alternative if need in rules}
            index = len(waiting)
            waiting.append(len(needs))
            owner.append(name)
            for need in needs:
                needed_by.setdefault(need, []).append(index)
            if not needs:
                ready.append(name)
    productive: set[str] = set()
    while ready:
        name = ready.pop()
        if name in productive:
            continue
        productive.add(name)
        for index in needed_by.get(name, ()):
            waiting[index] -= 1
            if waiting[index] == 0:
                ready.append(owner[index])
    return root in productive


def _read_rules(ebnf: str) -> dict[str, _Rule]:
    starts = list(_RULE_START.finditer(ebnf))
    rules: dict[str, _Rule] = {}
    for index, start in enumerate(starts):
        end = starts[index + 1].start() if index + 1 < len(starts) else len(ebnf)
        try:
            rules[start.group(1)] = _Rule(_alternatives(ebnf[start.end():end]))
        except _Opaque:
            rules[start.group(1)] = _Rule(opaque=True)
    return rules


def _alternatives(body: str) -> list[list[str]]:
    """The top-level alternatives of a rule body, each reduced to the rules it cannot do without.

    A parenthesized group is flattened conservatively: its needs are those every one of its alternatives
    shares, so a group counts as needing a rule only when no alternative avoids it."""
    tokens = _tokens(body)
    position = 0

    def sequence_list() -> list[list[str]]:
        nonlocal position
        alternatives: list[list[str]] = [[]]
        while position < len(tokens):
            kind, text, optional = tokens[position]
            if kind == "close":
                break
            position += 1
            if kind == "bar":
                alternatives.append([])
            elif kind == "lookahead":
                sequence_list()
                _expect_close()
            elif kind == "open":
                inner = sequence_list()
                _expect_close()
                if not _next_is_optional():
                    alternatives[-1].extend(_shared(inner))
            elif kind == "name" and not optional:
                alternatives[-1].append(text)
        return alternatives

    def _expect_close() -> None:
        nonlocal position
        if position >= len(tokens) or tokens[position][0] != "close":
            raise _Opaque
        position += 1

    def _next_is_optional() -> bool:
        nonlocal position
        if position < len(tokens) and tokens[position][0] == "repeat":
            position += 1
            return tokens[position - 1][2]
        return False

    result = sequence_list()
    if position != len(tokens):
        raise _Opaque
    return result


def _shared(alternatives: list[list[str]]) -> list[str]:
    needs = set(alternatives[0])
    for alternative in alternatives[1:]:
        needs &= set(alternative)
    return sorted(needs)


def _tokens(body: str) -> list[tuple[str, str, bool]]:
    """(kind, text, optional): `optional` marks a name or group followed by a repetition that allows zero."""
    tokens: list[tuple[str, str, bool]] = []
    position = 0
    while position < len(body):
        match = _TOKEN.match(body, position)
        if match is None:
            raise _Opaque
        position = match.end()
        kind = match.lastgroup or ""
        if kind == "low":
            kind = "repeat"
        if kind == "space":
            continue
        if kind == "repeat":
            text = match.group()
            zero = text in ("*", "?") or (match.group("low") is not None and int(match.group("low")) <= 0)
            tokens.append(("repeat", text, zero))
            if zero and tokens[-2:-1] and tokens[-2][0] == "name":
                tokens[-2] = (tokens[-2][0], tokens[-2][1], True)
            continue
        tokens.append((kind, match.group(), False))
    return tokens

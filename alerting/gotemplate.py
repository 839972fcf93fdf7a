"""Prometheus's Go-template syntax in rule labels and annotations, translated to jinja2.

Rule files brought from Prometheus write `{{ $labels.instance }}`, `{{ $value | humanize }}`
or `{{ printf "%.2f" $value }}`. Each `{{ … }}` action that is Go-template syntax is
rewritten into the jinja2 expression or statement with the same meaning; actions that are
already jinja2 (`{{ labels.instance }}`, `{{ value | round(1) }}`) and `{% … %}` blocks are
left alone. The supported subset is listed in docs/alerting.md; anything else is refused
with a `GoTemplateError` naming the construct.
"""

from __future__ import annotations

import ast
import re

# Go function → the jinja2 global of the same meaning (see templates.py).
FUNCTIONS = {
    "humanize": "humanize",
    "humanize1024": "humanize1024",
    "humanizePercentage": "humanizePercentage",
    "humanizeDuration": "humanizeDuration",
    "humanizeTimestamp": "humanizeTimestamp",
    "printf": "printf",
    "toUpper": "toUpper",
    "toLower": "toLower",
    "title": "title",
    "reReplaceAll": "reReplaceAll",
    "match": "match",
    "stripPort": "stripPort",
}
_COMPARISONS = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_LOGIC = {"and", "or", "not", "len", "index"}
_REFUSED = {
    "range": "range loops",
    "with": "with blocks",
    "define": "template definitions",
    "template": "template calls",
    "block": "template blocks",
    "query": "query() (templates cannot run queries here)",
    "first": "first (it works on query results)",
}
_VARIABLES = {
    "$labels": "labels",
    ".Labels": "labels",
    "$value": "value",
    ".Value": "value",
    "$externalLabels": "external_labels",
    ".ExternalLabels": "external_labels",
    "$externalURL": "external_url",
    ".ExternalURL": "external_url",
}

_ACTION = re.compile(r"\{\{(-?)(.*?)(-?)\}\}", re.DOTALL)
_TOKEN = re.compile(
    r"""\s*(?:
      (?P<string>"(?:[^"\\]|\\.)*"|`[^`]*`)
    | (?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
    | (?P<var>\$[A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*|\.[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)
    | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<punct>\||\(|\)|:=|=)
    )""",
    re.VERBOSE,
)


class GoTemplateError(ValueError):
    pass


def looks_like_go(action: str) -> bool:
    """An action in Go-template syntax rather than jinja2 (both use `{{ … }}`)."""
    text = action.strip()
    if not text or text.startswith("/*"):
        return True
    if text.startswith(("$", ".")) or re.search(r"(?<![\w\"'])\$[A-Za-z]", text):
        return True
    head = re.match(r"[A-Za-z_][A-Za-z0-9_]*", text)
    if head is None:
        return False
    word, rest = head.group(0), text[head.end() :]
    if word in ("if", "else", "end") or word in _REFUSED:
        return True
    callable_words = FUNCTIONS.keys() | _COMPARISONS.keys() | _LOGIC
    # `humanize value` is a Go call; `humanize(value)` is already jinja2.
    return word in callable_words and bool(rest) and rest[0].isspace() and bool(rest.strip())


def translate(source: str) -> str:
    """The jinja2 template with the meaning of `source`."""
    out: list[str] = []
    blocks: list[str] = []
    pos = 0
    for found in _ACTION.finditer(source):
        out.append(source[pos : found.start()])
        pos = found.end()
        left, body, right = found.groups()
        if not looks_like_go(body):
            out.append(found.group(0))
            continue
        out.append(_action(left, body.strip(), right, blocks))
    out.append(source[pos:])
    if blocks:
        raise GoTemplateError(
            f"unexpected end of template: {{{{ {blocks[-1]} }}}} has no {{{{ end }}}}"
        )
    return "".join(out)


def _action(left: str, body: str, right: str, blocks: list[str]) -> str:
    if body.startswith("/*"):
        if not body.endswith("*/"):
            raise GoTemplateError("unterminated comment in {{/* … */}}")
        return f"{{#{left} {body[2:-2]} {right}#}}"
    tokens = _tokens(body)
    head = tokens[0][1] if tokens[0][0] == "ident" else ""
    if head in _REFUSED:
        raise GoTemplateError(f"Go template {_REFUSED[head]} are not supported")
    if head == "if":
        blocks.append("if")
        return f"{{%{left} if {_pipeline(tokens[1:], body)} {right}%}}"
    if head == "else":
        if not blocks:
            raise GoTemplateError("{{ else }} outside {{ if }}")
        rest = tokens[1:]
        if rest and rest[0] == ("ident", "if"):
            return f"{{%{left} elif {_pipeline(rest[1:], body)} {right}%}}"
        if rest:
            raise GoTemplateError(f"unexpected {body!r}")
        return f"{{%{left} else {right}%}}"
    if head == "end":
        if not blocks or len(tokens) > 1:
            raise GoTemplateError("{{ end }} without a matching {{ if }}")
        return f"{{%{left} end{blocks.pop()} {right}%}}"
    return f"{{{{{left} {_pipeline(tokens, body)} {right}}}}}"


def _tokens(body: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(body):
        if not body[pos:].strip():
            break
        found = _TOKEN.match(body, pos)
        if found is None or found.end() == pos:
            raise GoTemplateError(f"cannot read {body[pos:].strip()!r} in {{{{ {body} }}}}")
        kind = found.lastgroup or ""
        out.append((kind, found.group(kind)))
        pos = found.end()
    if not out:
        raise GoTemplateError("empty action {{ }}")
    if any(t == ("punct", ":=") or t == ("punct", "=") for t in out):
        raise GoTemplateError(f"template variables ({body!r}) are not supported")
    return out


def _pipeline(tokens: list[tuple[str, str]], body: str) -> str:
    """`a | f b | g` → `g(f(b, a))`: each command gets the previous result as last arg."""
    if not tokens:
        raise GoTemplateError(f"missing value in {{{{ {body} }}}}")
    commands: list[list[tuple[str, str]]] = [[]]
    depth = 0
    for token in tokens:
        if token == ("punct", "|") and depth == 0:
            commands.append([])
            continue
        if token == ("punct", "("):
            depth += 1
        elif token == ("punct", ")"):
            depth -= 1
        commands[-1].append(token)
    if depth != 0:
        raise GoTemplateError(f"unbalanced parentheses in {{{{ {body} }}}}")
    piped: str | None = None
    for command in commands:
        if not command:
            raise GoTemplateError(f"empty command in pipeline {{{{ {body} }}}}")
        piped = _command(command, piped, body)
    assert piped is not None
    return piped


def _command(tokens: list[tuple[str, str]], piped: str | None, body: str) -> str:
    kind, text = tokens[0]
    if kind == "ident" and text not in ("true", "false", "nil"):
        args = _operands(tokens[1:], body)
        if piped is not None:
            args.append(piped)
        return _call(text, args)
    operands = _operands(tokens, body)
    if len(operands) != 1 or piped is not None:
        raise GoTemplateError(f"can't give arguments to a non-function in {{{{ {body} }}}}")
    return operands[0]


def _call(name: str, args: list[str]) -> str:
    if name in _COMPARISONS:
        if len(args) < 2:
            raise GoTemplateError(f"{name} needs two arguments")
        op = _COMPARISONS[name]
        if name == "eq" and len(args) > 2:
            return "(" + " or ".join(f"{args[0]} == {a}" for a in args[1:]) + ")"
        if len(args) != 2:
            raise GoTemplateError(f"{name} takes two arguments")
        return f"({args[0]} {op} {args[1]})"
    if name in ("and", "or"):
        if len(args) < 2:
            raise GoTemplateError(f"{name} needs at least two arguments")
        return "(" + f" {name} ".join(args) + ")"
    if name == "not":
        if len(args) != 1:
            raise GoTemplateError("not takes one argument")
        return f"(not {args[0]})"
    if name == "len":
        if len(args) != 1:
            raise GoTemplateError("len takes one argument")
        return f"({args[0]} | length)"
    if name == "index":
        if len(args) < 2:
            raise GoTemplateError("index needs a collection and a key")
        return args[0] + "".join(f"[{a}]" for a in args[1:])
    if name in _REFUSED:
        raise GoTemplateError(f"Go template {_REFUSED[name]} are not supported")
    if name not in FUNCTIONS:
        known = ", ".join(sorted(FUNCTIONS) + sorted(_COMPARISONS) + sorted(_LOGIC))
        raise GoTemplateError(
            f"function {name!r} is not supported in templates (supported: {known})"
        )
    return f"{FUNCTIONS[name]}({', '.join(args)})"


def _operands(tokens: list[tuple[str, str]], body: str) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        if text == "(" and kind == "punct":
            depth, j = 1, i + 1
            while j < len(tokens) and depth:
                if tokens[j] == ("punct", "("):
                    depth += 1
                elif tokens[j] == ("punct", ")"):
                    depth -= 1
                j += 1
            out.append(f"({_pipeline(tokens[i + 1 : j - 1], body)})")
            i = j
            continue
        out.append(_operand(kind, text, body))
        i += 1
    return out


def _operand(kind: str, text: str, body: str) -> str:
    if kind == "string":
        value = text[1:-1] if text.startswith("`") else ast.literal_eval(text)
        return repr(value)
    if kind == "number":
        return text
    if kind == "ident":
        if text in ("true", "false"):
            return text
        if text == "nil":
            return "none"
        raise GoTemplateError(f"function {text!r} used as a value in {{{{ {body} }}}}")
    if kind == "var":
        return _variable(text, body)
    raise GoTemplateError(f"unexpected {text!r} in {{{{ {body} }}}}")


def _variable(text: str, body: str) -> str:
    for prefix, name in _VARIABLES.items():
        if text == prefix:
            return name
        if text.startswith(prefix + "."):
            fields = text[len(prefix) + 1 :].split(".")
            if name not in ("labels", "external_labels") or len(fields) != 1:
                raise GoTemplateError(f"{text} has no fields in {{{{ {body} }}}}")
            return f"{name}[{fields[0]!r}]"
    if text in ("$", "."):
        raise GoTemplateError(
            f"the whole template data ({text}) is not available; use $labels or $value"
        )
    raise GoTemplateError(
        f"unknown variable {text} in {{{{ {body} }}}}: use $labels, $value, $externalLabels "
        "or $externalURL"
    )

"""The calculator tool's safe arithmetic: a recursive-descent parser over exact fractions.

    calculate("12*(3+4)")  -> "84"
    calculate("1/0")       -> "error: division by zero"   (never raises)

Design choices
- Nothing here calls eval or exec: the text is tokenized by one regex and read by a small
  recursive-descent parser with Python's precedence (`^` is a synonym of `**`).
- Values are exact fractions, so results do not depend on floating-point rounding.
- Every call does bounded work: limits on the expression's length, its nesting depth, literal
  sizes and the size of every intermediate number (checked before a power is computed).
"""
from __future__ import annotations

import re
from fractions import Fraction

MAX_EXPR_CHARS = 200  # the calculator reads at most this much
MAX_DEPTH = 40  # parentheses plus unary signs
MAX_BITS = 256  # numerators and denominators stay below 2**256 (~77 digits): bounded work and replies
_CALC_TOKEN = re.compile(r"\s*(?:([0-9]+(?:\.[0-9]+)?)|(\*\*|[-+*/^()]))")


class CalcError(ValueError):
    """An expression the calculator refuses; calculate() turns it into an "error: ..." reply."""


def calculate(expr: str) -> str:
    """Evaluate arithmetic safely; returns the result as text, or "error: ..." (never raises).

    Grammar (Python precedence; `^` is a synonym of `**`, which is right-associative):
        expr  := term (("+" | "-") term)*
        term  := unary (("*" | "/") unary)*
        unary := ("+" | "-") unary | power
        power := atom (("**" | "^") unary)?
        atom  := NUMBER | "(" expr ")"
    Values are exact fractions; non-integers are shown rounded to 6 decimals.
    """
    try:
        if not isinstance(expr, str):
            raise CalcError("expression must be a string")
        if len(expr) > MAX_EXPR_CHARS:
            raise CalcError(f"expression longer than {MAX_EXPR_CHARS} characters")
        return _format(_Calc(expr).run())
    except CalcError as err:
        return f"error: {err}"
    except ZeroDivisionError:
        return "error: division by zero"


def _check(value: Fraction) -> Fraction:
    """Every intermediate result passes here: bounded numbers mean bounded work."""
    if value.numerator.bit_length() > MAX_BITS or value.denominator.bit_length() > MAX_BITS:
        raise CalcError("number too large")
    return value


def _format(value: Fraction) -> str:
    """An integer as is; anything else rounded to 6 decimals, trailing zeros dropped."""
    if value.denominator == 1:
        return str(value.numerator)
    scaled = round(value * 10**6)
    digits = f"{abs(scaled) // 10**6}.{abs(scaled) % 10**6:06d}".rstrip("0").rstrip(".")
    return ("-" if scaled < 0 else "") + digits


class _Calc:
    """Recursive-descent evaluator; depth is bounded so recursion stays far below Python's limit."""

    def __init__(self, text: str):
        self.toks, pos, text = [], 0, text.rstrip()
        while pos < len(text):
            match = _CALC_TOKEN.match(text, pos)
            if not match:
                raise CalcError(f"unexpected character {text[pos:].lstrip()[:1]!r}")
            if match.group(1) is not None and len(match.group(1)) > 40:
                raise CalcError("number literal too long")
            self.toks.append(match.group(1) or match.group(2))
            pos = match.end()
        self.pos, self.depth = 0, 0

    def run(self) -> Fraction:
        if not self.toks:
            raise CalcError("empty expression")
        value = self.expr()
        if self.pos != len(self.toks):
            raise CalcError(f"unexpected {self.toks[self.pos]!r}")
        return value

    def peek(self):
        return self.toks[self.pos] if self.pos < len(self.toks) else None

    def take(self):
        tok = self.peek()
        if tok is None:
            raise CalcError("unexpected end of expression")
        self.pos += 1
        return tok

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            value = _check(value + self.term() if self.take() == "+" else value - self.term())
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while self.peek() in ("*", "/"):
            op = self.take()
            rhs = self.unary()
            value = _check(value * rhs if op == "*" else value / rhs)  # Fraction / 0 raises ZeroDivisionError
        return value

    def unary(self) -> Fraction:
        if self.peek() in ("+", "-"):
            op = self.take()
            value = self.nested(self.unary)
            return -value if op == "-" else value
        return self.power()

    def power(self) -> Fraction:
        base = self.atom()
        if self.peek() in ("**", "^"):
            self.take()
            exp = self.nested(self.unary)
            if exp.denominator != 1:
                raise CalcError("exponent must be an integer")
            size = max(base.numerator.bit_length(), base.denominator.bit_length())
            if abs(exp) > 4 * MAX_BITS or (size > 1 and (size - 1) * abs(exp) > MAX_BITS):
                raise CalcError("number too large")  # decided before computing the power
            return _check(base ** int(exp))  # 0 ** -1 raises ZeroDivisionError
        return base

    def atom(self) -> Fraction:
        tok = self.take()
        if tok == "(":
            value = self.nested(self.expr)
            if self.take() != ")":
                raise CalcError("missing )")
            return value
        if tok[0].isdigit():
            return _check(Fraction(tok))
        raise CalcError(f"unexpected {tok!r}")

    def nested(self, read):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise CalcError("expression nested too deeply")
        try:
            return read()
        finally:
            self.depth -= 1


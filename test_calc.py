"""Tests for calc.py: the calculator's safe arithmetic."""
import random
import time

import pytest

import calc


@pytest.mark.parametrize("expr, out", [
    ("2+3*4", "14"), ("(2+3)*4", "20"), ("2**10", "1024"), ("2^10", "1024"), ("2**3**2", "512"),
    ("-2**2", "-4"), ("2**-1", "0.5"), ("-3--3", "0"), ("7/2", "3.5"), ("1/3", "0.333333"),
    (" 12 * ( 3 + 4 ) ", "84"), ("1.5*2", "3"), ("+-+1", "-1"), ("10/4*2", "5"),
    ("1/0", "error: division by zero"), ("0**-1", "error: division by zero"), ("(1-1)**-2", "error: division by zero"),
    ("2**0.5", "error: exponent must be an integer"), ("9**9**9", "error: number too large"),
    ("2**100000000", "error: number too large"), ("10**80", "error: number too large"),
    ("1" * 41, "error: number literal too long"), ("(" * 50 + "1" + ")" * 50, "error: expression nested too deeply"),
    ("-" * 60 + "1", "error: expression nested too deeply"), ("1+", "error: unexpected end of expression"),
    ("(1", "error: unexpected end of expression"), ("1)", "error: unexpected ')'"), ("", "error: empty expression"),
    ("1e5", "error: unexpected character 'e'"), ("__import__('os')", "error: unexpected character '_'"),
    ("١٢٣+4", "error: unexpected character '١'"), ("1" * 201, "error: expression longer than 200 characters"),
])
def test_calculate(expr, out):
    assert calc.calculate(expr) == out


def test_calculate_fuzz():
    rng = random.Random(0)
    alphabet = "0123456789+-*/^()). "
    start, n = time.perf_counter(), 0
    for _ in range(3000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 80)))
        out = calc.calculate(s)
        assert isinstance(out, str) and len(out) < 100
        n += 1
    for s in ["1+" * 500000 + "1", "(" * 10**6, "9" * 10**6, "\u0000" * 10**6, None, 12]:
        t = time.perf_counter()
        assert calc.calculate(s).startswith("error: ")
        assert time.perf_counter() - t < 0.5
    assert time.perf_counter() - start < 20

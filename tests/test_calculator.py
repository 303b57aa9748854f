"""The calculator evaluates arithmetic and letter counts, and refuses everything else quickly."""

import pytest

from nanochat.calculator import MAX_EXPR_CHARS, CalculatorError, evaluate, use_calculator


@pytest.mark.parametrize("expr, value", [
    ("1 + 2 * 3", 7),
    ("(1 + 2) * 3", 9),
    ("10 / 4", 2.5),
    ("7 // 2", 3),
    ("7 % 4", 3),
    ("-3 + +5", 2),
    ("2 ** 10", 1024),
    ("2 ** -1", 0.5),
    ("1,234 * 2", 2468),          # thousands separators are stripped, as nanochat does
    ("0.1 * 3", 0.1 * 3),
    ("'strawberry'.count('r')", 3),
    ('"a,b,c".count(",")', 2),    # commas inside strings are kept
])
def test_arithmetic_and_letter_counting(expr, value):
    assert evaluate(expr) == value


def test_use_calculator_formats_like_python_str():
    assert use_calculator("48 / 2") == "24.0"
    assert use_calculator("6 * 7") == "42"
    assert use_calculator("1 / 0") is None


HOSTILE = [
    "9 ** 9 ** 9",                                  # right-associative power chain
    "2 ** 2 ** 2 ** 2 ** 2 ** 2",
    "10 ** 1000",
    "1.5 ** 100000",
    "1 ** 10 ** 50",                                # small value, enormous exponent
    "9" * 200,                                      # a literal far beyond the size cap
    "99999999999999999999 ** 6 * 99999999999999999999 ** 6",
    "(10 ** 60) * (10 ** 60)",
    "1e308 * 10",                                   # float overflow to inf
    "'a' * 10 ** 9",                                # string arithmetic is not numeric
    "'ab' + 'cd'",
    "__import__('os').system('echo pwned')",
    "open('/etc/passwd').read()",
    "x + 1",                                        # names
    "True + 1",                                     # bools are not numbers here
    "().__class__.__bases__[0].__subclasses__()",  # dunder walk
    "'abc'.__class__",
    "'abc'.upper()",
    "'abc'.count(x)",
    "'abc'.count('a', 0)",
    "[1, 2, 3]",
    "[x for x in range(10 ** 9)]",
    "lambda: 1",
    "1 if 1 else 2",
    "1j * 2",
    "(" * 300 + "1" + ")" * 300,                    # deep nesting
    "((((((((((((((((((((((((((((((((((((((((((((((((((2" + "**2)" * 50,  # nested power chain
    "-" * 250 + "1",                                # long unary chain
    "1+" * 120 + "1",                               # long expression, too many nodes
    "1 + 1" * 1000,                                 # longer than the cap
    "'" + "a" * 10000 + "'.count('a')",
    "",
    "   ",
    "2 ** 0.5 ** -1000",
    "0.5 ** -5000",                                 # float power overflow (OverflowError in Python)
    "0.1 ** -400",
    "1e-300 ** -2",
    "1e100 / 1e-300",
    "(-8) ** 0.5",
    "0 ** -1",
]


@pytest.mark.parametrize("expr", HOSTILE)
def test_hostile_input_is_refused_quickly(expr, capfd):
    # "quickly" is structural (caps checked before the work): without them some of these run for
    # minutes or exhaust memory, and the suite's per-test timeout (pyproject.toml) fails the test
    with pytest.raises(CalculatorError):
        evaluate(expr)
    assert use_calculator(expr) is None
    out, err = capfd.readouterr()
    assert "pwned" not in out + err


def test_length_cap_is_applied_before_parsing():
    expr = "1" + "+1" * MAX_EXPR_CHARS
    with pytest.raises(CalculatorError, match="longer than"):
        evaluate(expr)


def test_values_just_under_the_caps_are_computed():
    assert evaluate("10 ** 100") == 10 ** 100
    assert evaluate("2 ** 300") == 2 ** 300
    assert evaluate("0.5 ** 5000") == 0.5 ** 5000
    assert evaluate("(" * 120 + "1" + ")" * 120) == 1
    assert evaluate("10 ** -400") == 0.0
    assert evaluate("0.5 ** -300") == 2.0 ** 300


def test_random_inputs_only_ever_raise_calculator_error():
    # Seeded fuzz over arithmetic-looking strings: a value or CalculatorError, nothing else (a hang
    # is the per-test timeout's to catch).
    import random
    rng = random.Random(0)
    pieces = ["9", "99", "0", "1.5", "1e300", "1e-300", "-", "+", "*", "/", "//", "%", "**", "(", ")",
              " ", ",", "'ab'", ".count(", "'a')", "x", "__class__", ".", "_", "[", "]", "0.5"]
    for _ in range(3000):
        expr = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 30)))
        try:
            value = evaluate(expr)
        except CalculatorError:
            continue
        assert isinstance(value, (int, float)) and not isinstance(value, bool)

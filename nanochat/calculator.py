"""
The calculator tool the chat model calls with <|python_start|> expr <|python_end|>.

nanochat ran eval() on the expression after a character filter. Here nothing is ever executed:
the expression is parsed with ast and a small tree walker evaluates a whitelist of numeric
operations, plus "some string".count("x") for letter counting. Time and memory are bounded by
construction rather than by a timer: the expression length is capped, every intermediate number
is capped in size, and a power is refused before it is computed when its result would be too big.
Anything else (names, attributes, calls, comprehensions, huge numbers) returns None.
"""
from __future__ import annotations

import ast
import math
import operator

MAX_EXPR_CHARS = 256        # nanochat's tool calls are short arithmetic; longer input is refused unparsed
MAX_ABS_VALUE = 10 ** 100   # bound on every intermediate number: keeps int arithmetic and str() cheap
MAX_POW_DIGITS = 100        # a power whose result would have more decimal digits than this is refused
MAX_NODES = 200             # bound on the work done by the tree walk

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalculatorError(ValueError):
    """The expression is not something the calculator evaluates (or its value is out of bounds)."""


def _check_number(x):
    # bool is an int subclass; complex numbers and anything else are not calculator values
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise CalculatorError(f"not a number: {type(x).__name__}")
    if isinstance(x, float) and not math.isfinite(x):
        raise CalculatorError("non-finite result")
    if abs(x) > MAX_ABS_VALUE:
        raise CalculatorError("number too large")
    return x


def _safe_pow(base, exp):
    if isinstance(exp, float) and not exp.is_integer() and base < 0:
        raise CalculatorError("fractional power of a negative number")
    if base == 0 and exp < 0:
        raise CalculatorError("zero to a negative power")
    if base != 0 and exp * math.log10(abs(base)) > MAX_POW_DIGITS:
        # digits of the result, estimated before computing it: 9**9**9 and 0.5**-5000 are never attempted
        raise CalculatorError("power too large")
    if abs(exp) > 10_000:
        # the value is small here, but a huge exponent is never a sensible calculator input
        raise CalculatorError("exponent too large")
    try:
        return base ** exp
    except (OverflowError, ZeroDivisionError) as e:
        raise CalculatorError(f"power: {e}") from None


class _Evaluator:
    def __init__(self):
        self.nodes = 0

    def eval(self, node):
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise CalculatorError("expression too complex")
        if isinstance(node, ast.Expression):
            return self.eval(node.body)
        if isinstance(node, ast.Constant):
            if isinstance(node.value, str):
                return node.value
            return _check_number(node.value)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _check_number(_UNARY[type(node.op)](_check_number(self.eval(node.operand))))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            # numbers only: "a" * 10**9 or "a" + "b" are refused here
            left = _check_number(self.eval(node.left))
            right = _check_number(self.eval(node.right))
            if isinstance(node.op, ast.Pow):
                return _check_number(_safe_pow(left, right))
            try:
                return _check_number(_BINARY[type(node.op)](left, right))
            except (ZeroDivisionError, OverflowError) as e:
                raise CalculatorError(str(e)) from None
        if isinstance(node, ast.Call):
            return self._count(node)
        raise CalculatorError(f"not allowed: {type(node).__name__}")

    def _count(self, node: ast.Call) -> int:
        """Only "literal".count("literal"): nanochat's letter-counting tool call."""
        func = node.func
        if not (isinstance(func, ast.Attribute) and func.attr == "count"
                and isinstance(func.value, ast.Constant) and isinstance(func.value.value, str)):
            raise CalculatorError("only 'text'.count('x') calls are allowed")
        if node.keywords or len(node.args) != 1:
            raise CalculatorError("count takes one argument")
        arg = node.args[0]
        if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
            raise CalculatorError("count takes a string literal")
        self.nodes += 2
        return func.value.value.count(arg.value)


def evaluate(expr: str):
    """The value of a calculator expression, or raise CalculatorError. Never executes code."""
    if not isinstance(expr, str):
        raise CalculatorError("expression must be a string")
    expr = expr.strip()
    if not expr or len(expr) > MAX_EXPR_CHARS:
        raise CalculatorError(f"expression empty or longer than {MAX_EXPR_CHARS} characters")
    if "'" not in expr and '"' not in expr:
        expr = expr.replace(",", "")  # "1,234 * 5": thousands separators, as nanochat strips them
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        # deep nesting raises MemoryError/RecursionError in some Python versions; all are bad input
        raise CalculatorError(f"cannot parse: {e.__class__.__name__}") from None
    try:
        value = _Evaluator().eval(tree)
    except RecursionError:
        raise CalculatorError("expression nested too deeply") from None
    except (ArithmeticError, ValueError, TypeError) as e:
        # every operation is checked above; this is the backstop that keeps a tool call from ever
        # raising anything but CalculatorError into the generation loop
        raise CalculatorError(f"{type(e).__name__}: {e}") from None
    if isinstance(value, str):
        raise CalculatorError("result is a string")
    return value


def use_calculator(expr: str) -> str | None:
    """What the engine forces into the sequence after <|python_end|>: str(value), or None when the
    expression is refused (then nothing is forced, as in nanochat)."""
    try:
        return str(evaluate(expr))
    except CalculatorError:
        return None

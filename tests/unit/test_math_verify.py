"""Math verification: answer extraction, equivalence, and the killable verifier process."""

from __future__ import annotations

import time

import pytest

from rewards.math import MathVerifier, Verdict, extract_answer, verify

# (predicted answer, gold answer, equal?)
EQUIVALENCE = [
    ("42", "42", True),
    ("-7", "-7", True),
    ("-7", "7", False),
    ("1,000", "1000", True),
    ("1000", "1,000", True),
    ("1{,}000", "1000", True),
    ("012", "12", True),
    ("3.0", "3", True),
    ("3.5", "3.6", False),
    ("0.5", "\\frac{1}{2}", True),
    ("\\frac{1}{2}", "0.5", True),
    ("\\frac{2}{4}", "\\frac{1}{2}", True),
    ("\\dfrac{3}{4}", "0.75", True),
    ("1/3", "0.333", False),
    ("x = 2", "2", True),
    ("2", "x=2", True),
    ("y = 3", "x = 3", False),
    ("\\sqrt{8}", "2\\sqrt{2}", True),
    ("(x+1)^2", "x^2+2x+1", True),
    ("x^2", "x^3", False),
    ("\\pi", "\\pi", True),
    ("2\\pi", "\\pi", False),
    ("2+3i", "3i+2", True),
    ("\\$5", "5", True),
    ("5\\text{ cm}", "5", True),
    ("\\text{(A)}", "A", True),
    ("\\{1, 2, 3\\}", "\\{3, 2, 1\\}", True),
    ("\\{1, 2\\}", "\\{1, 3\\}", False),
    ("(1, 2)", "(2, 1)", False),
    ("[0, 1)", "[0,1)", True),
    ("[0, 1]", "(0, 1)", False),
    ("(-\\infty, 3]", "(-\\infty,3]", True),
    ("x \\in [1,2]", "[1,2]", True),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", True),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}2\\\\1\\end{pmatrix}", False),
    ("\\emptyset", "\\{\\}", True),
]


@pytest.mark.parametrize("pred, gold, equal", EQUIVALENCE)
def test_equivalence(pred, gold, equal):
    verdict = verify(f"The answer is $\\boxed{{{pred}}}$.", gold)
    assert verdict == Verdict(equal, "equal" if equal else "not equal")


def test_verify_is_not_symmetric():
    # math-verify compares an interval with a relation only when the prediction is the set.
    assert verify("\\boxed{(1,2)}", "1 < x < 2").correct
    assert not verify("\\boxed{1 < x < 2}", "(1,2)").correct


@pytest.mark.parametrize(
    "text, answer",
    [
        ("so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\boxed{3}}", "\\boxed{3}"),
        ("\\boxed{x^{2^{3}}} and {braces}", "x^{2^{3}}"),
        ("\\boxed{ 7 }", "7"),
        ("\\boxed{1} and an unclosed \\boxed{2", "1"),
        ("\\boxed{unclosed {1} and \\boxed{5}", "5"),
        ("<answer>12</answer> later <answer> 13 </answer>", "13"),
        ("\\boxed{4} beats <answer>5</answer>", "4"),
        ("work\nAnswer: 17\n", "17"),
        ("Answer: 1\nmore work\n**Final Answer:** $x = 3$.", "x = 3"),
        ("no final answer here", None),
        ("\\boxed{never closed", None),
        ("", None),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize(
    "completion, reason",
    [("no answer", "no answer found"), ("\\boxed{}", "no answer found"), ("\\boxed{" + "1" * 10_001 + "}", "answer too long")],
)
def test_verify_rejects(completion, reason):
    assert verify(completion, "1") == Verdict(False, reason)


@pytest.fixture(scope="module")
def verifier():
    with MathVerifier() as v:
        yield v


def test_verifier_scores_in_order(verifier):
    items = [(f"\\boxed{{{i}}}", str(i if i % 3 else i + 1)) for i in range(30)] + [("\\boxed{\\frac{1}{2}}", "0.5")]
    verdicts = verifier.score(items)
    assert [v.correct for v in verdicts] == [i % 3 != 0 for i in range(30)] + [True]


def test_verifier_timeout_then_recovers(verifier):
    slow = ("\\boxed{(x+1)^2}", "x^2+2x+1")  # sympy needs far longer than 1 ms
    verdicts = verifier.score([slow, ("\\boxed{2}", "2"), ("\\boxed{3}", "4")], timeout_s=0.001)
    assert verdicts[0] == Verdict(False, "timeout")
    assert verifier.score([slow, ("\\boxed{2}", "2"), ("\\boxed{3}", "4")]) == [
        Verdict(True, "equal"),
        Verdict(True, "equal"),
        Verdict(False, "not equal"),
    ]


ADVERSARIAL = {
    "power tower": "\\boxed{9^{9^{9^{9^{9}}}}}",
    "huge factorial": "\\boxed{100000!}",
    "huge power": "\\boxed{2^{2^{40}}}",
    "2000 nested braces": "\\boxed{" + "{" * 2000 + "1" + "}" * 2000 + "}",
    "2000 nested boxes": "\\boxed{" * 2000 + "1" + "}" * 2000,
    "1 MB without answer": "x{" * 500_000,
    "1 MB then answer": "a" * 1_000_000 + "\\boxed{6}",
    "odd bytes": bytes(range(256)).decode("utf-8", errors="replace") + "\udcff\ud800 \\boxed{\ufffd\udcff}",
}


@pytest.mark.parametrize("completion", ADVERSARIAL.values(), ids=ADVERSARIAL.keys())
def test_verifier_survives_adversarial_input(verifier, completion):
    start = time.monotonic()
    verdicts = verifier.score([(completion, "5"), ("\\boxed{\\frac{3}{6}}", "1/2")], timeout_s=1.0)
    assert time.monotonic() - start < 10  # 1 s limit plus a child restart on a loaded machine
    assert not verdicts[0].correct and verdicts[0].reason
    assert verdicts[1] == Verdict(True, "equal")

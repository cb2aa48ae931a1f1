"""Math verification: answer extraction, the killable verifier process, and adversarial input
(the equivalence table is in test_math_equivalence.py)."""

from __future__ import annotations

import time

import pytest

from rewards.math import MathVerifier, Verdict, extract_answer, verify


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


def test_extract_answer_formats_are_configurable():
    text = "\\boxed{1} <answer>2</answer>\nAnswer: 3"
    assert extract_answer(text, ("answer_tag",)) == "2"
    assert extract_answer(text, ("answer_line", "boxed")) == "3"
    assert extract_answer("\\boxed{1}", ("answer_tag", "answer_line")) is None
    assert verify("<answer>7</answer> \\boxed{8}", "7", ("answer_tag",)).correct
    with pytest.raises(ValueError, match="unknown answer format"):
        extract_answer(text, ("latex",))


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
    "non-UTF-8 bytes": (bytes(range(128, 256)) * 4000 + b"\\boxed{5\xff}").decode("utf-8", errors="surrogateescape"),
    "python power": "\\boxed{2**10**10}",
    "power of powers": "\\boxed{2^{10^{10}}}",
    "stacked factorials": "\\boxed{10!!!!}",
    "factorial of power": "\\boxed{(10^{10})!}",
    "500 nested fractions": "\\boxed{" + "\\frac{1}{" * 500 + "2" + "}" * 500 + "}",
    "500 nested sqrt": "\\boxed{" + "\\sqrt{" * 500 + "2" + "}" * 500 + "}",
    "1 MB answer line": "Answer: " + "9" * 1_000_000,
}


@pytest.mark.parametrize("completion", ADVERSARIAL.values(), ids=ADVERSARIAL.keys())
def test_verifier_survives_adversarial_input(verifier, completion):
    start = time.monotonic()
    verdicts = verifier.score([(completion, "5"), ("\\boxed{\\frac{3}{6}}", "1/2")], timeout_s=1.0)
    assert time.monotonic() - start < 10  # 1 s limit plus a child restart on a loaded machine
    assert not verdicts[0].correct and verdicts[0].reason
    assert verdicts[1] == Verdict(True, "equal")

"""A table of math equivalence cases (gold, prediction, equal?), each scored by `verify`.

The prediction is wrapped as `\\boxed{...}` so that only the comparison is under test.
Tolerance (see rewards.math): integers compare exactly; other numbers within a relative
1e-6; a percentage equals its number with the percent sign dropped.
"""

from __future__ import annotations

import pytest

from rewards.math import verify

CASES = [
    # integers, signs, separators
    ("42", "42", True),
    ("42", "43", False),
    ("-7", "-7", True),
    ("-7", "7", False),
    ("1000", "1,000", True),
    ("1000000", "1,000,000", True),
    ("1000000", "1\\,000\\,000", True),
    ("1000000", "1 000 000", True),
    ("1000000", "1000001", False),
    ("12", "012", True),
    ("12", "+12", True),
    # fractions and decimals
    ("\\frac{1}{2}", "0.5", True),
    ("0.5", "\\frac{1}{2}", True),
    ("\\frac{1}{2}", "1/2", True),
    ("\\frac{1}{2}", "\\dfrac{2}{4}", True),
    ("\\frac{1}{3}", "0.333", False),
    ("\\frac{1}{3}", "0.3333333333", True),
    ("3", "3.0", True),
    ("3", "3.00", True),
    ("3.5", "3.6", False),
    ("-\\frac{3}{4}", "-0.75", True),
    ("\\frac{-3}{4}", "-\\frac{3}{4}", True),
    ("0.1", "0.1000000001", True),
    ("0.1", "0.1001", False),
    # scientific notation
    ("1500", "1.5e3", True),
    ("1500", "1.5 \\times 10^{3}", True),
    ("1500", "1.5 \\times 10^3", True),
    ("0.00025", "2.5e-4", True),
    ("2.5 \\times 10^{-4}", "0.00025", True),
    ("1500", "1.5e4", False),
    # percentages and units text
    ("50\\%", "50", True),
    ("50", "50\\%", True),
    ("50\\%", "50\\%", True),
    ("50\\%", "40\\%", False),
    ("5", "5\\text{ cm}", True),
    ("5", "5 \\mathrm{cm}", True),
    ("5", "5 cm", True),
    ("12", "12 meters", True),
    ("5", "6\\text{ cm}", False),
    ("\\$5", "5", True),
    ("90^\\circ", "90", True),
    # equations and relations
    ("2", "x = 2", True),
    ("x=2", "2", True),
    ("2", "x = 3", False),
    ("3", "y = 3", True),
    ("x = 3", "y = 3", False),
    # LaTeX expressions
    ("2\\sqrt{2}", "\\sqrt{8}", True),
    ("x^2+2x+1", "(x+1)^2", True),
    ("x^3", "x^2", False),
    ("\\pi", "\\pi", True),
    ("\\frac{\\pi}{2}", "\\pi/2", True),
    ("2\\pi", "\\pi", False),
    ("3i+2", "2+3i", True),
    ("\\sqrt{2}/2", "\\frac{1}{\\sqrt{2}}", True),
    ("e^{2}", "e^2", True),
    ("\\ln 2", "\\log 3", False),
    # intervals
    ("[0,1)", "[0, 1)", True),
    ("(0, 1)", "[0, 1]", False),
    ("(-\\infty,3]", "(-\\infty, 3]", True),
    ("[1,2]", "x \\in [1,2]", True),
    ("(1, 2) \\cup (3, 4)", "(1,2)\\cup(3,4)", True),
    ("(1, 2) \\cup (3, 4)", "(1,2)\\cup(3,5)", False),
    # sets and tuples
    ("\\{3, 2, 1\\}", "\\{1, 2, 3\\}", True),
    ("\\{1, 3\\}", "\\{1, 2\\}", False),
    ("(2, 1)", "(1, 2)", False),
    ("(1, 2)", "(1, 2)", True),
    ("(1, \\frac{1}{2})", "(1, 0.5)", True),
    ("\\{\\}", "\\emptyset", True),
    ("1, 2, 3", "1,2,3", True),
    # matrices
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", True),
    ("\\begin{pmatrix}2\\\\1\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", False),
    ("\\begin{pmatrix}1 & 2\\\\3 & 4\\end{pmatrix}", "\\begin{bmatrix}1 & 2\\\\3 & 4\\end{bmatrix}", True),
    ("\\begin{pmatrix}1 & 2\\\\3 & 4\\end{pmatrix}", "\\begin{pmatrix}1 & 2\\\\4 & 3\\end{pmatrix}", False),
    # text answers
    ("A", "\\text{(A)}", True),
    ("B", "\\text{(A)}", False),
]


@pytest.mark.parametrize("gold, pred, equal", CASES)
def test_equivalence_table(gold, pred, equal):
    verdict = verify(f"so the answer is $\\boxed{{{pred}}}$", gold)
    assert verdict.correct == equal, verdict


def test_table_is_large_and_balanced():
    assert len(CASES) >= 60
    assert 20 <= sum(not equal for _, _, equal in CASES) <= len(CASES) - 20

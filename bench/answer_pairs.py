"""A fixed set of (completion, gold answer) pairs with the verdict a careful human grader gives.

Used by ``bench/answer_agreement.py`` to measure fastgrpo's own answer checker against math-verify. Each pair
is ``(category, completion, gold, expected)``; the verdict was decided by hand, question by question, on
mathematical meaning: a number with a unit matches the bare number (the unit is what the question asks for),
a set matches in any order, ``50%`` equals ``0.5``, a rounded decimal does not equal a repeating fraction, and
a completion whose final answer is missing or differs is wrong. Where a pair is debatable the comment says
why the verdict is what it is.

The first 112 pairs were used to find and fix the builtin checker's errors (and the span adapter of the
math-verify backend), so both checkers' scores on them are optimistic; the ``held_out`` pairs were written
afterwards, their verdicts fixed before either checker ran on them, and no code was changed for them.

Categories: ``latex`` (LaTeX expressions, boxed or in tags), ``units``, ``sets`` (sets, lists of roots,
intervals), ``gsm8k`` (golds that are full GSM8K solutions ending in ``#### N``, completions in GSM8K style
or with tags), ``fractions`` and ``answer_is`` (the final answer stated in prose).
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["AnswerPair", "ANSWER_PAIRS", "CATEGORIES"]


class AnswerPair(NamedTuple):
    category: str
    completion: str
    gold: str
    expected: bool
    held_out: bool = False  # written after the builtin checker's fixes and never used to tune either checker


CATEGORIES = ("latex", "units", "sets", "gsm8k", "fractions", "answer_is")

_GSM_CLIPS = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)
_GSM_WENG = "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"
_GSM_BETTY = (
    "In the beginning, Betty has only 100 / 2 = $<<100/2=50>>50.\nBetty's grandparents gave her 15 * 2 = "
    "$<<15*2=30>>30.\nThis means, Betty needs 100 - 50 - 30 - 15 = $<<100-50-30-15=5>>5 more.\n#### 5"
)
_GSM_JAMES = "He writes each friend 3*2=<<3*2=6>>6 pages a week\nSo he writes 6*2=<<6*2=12>>12 pages every week\nThat means he writes 12*52=<<12*52=624>>624 pages a year\n#### 624"
_GSM_BIG = "The farm has 1200 - 120 = <<1200-120=1080>>1080 sheep left.\n#### 1080"
_GSM_DEC = "Each cupcake costs 7.5 / 3 = <<7.5/3=2.5>>2.5 dollars.\n#### 2.5"
_GSM_NEG = "The temperature changed by 3 - 8 = <<3-8=-5>>-5 degrees.\n#### -5"

# fmt: off
ANSWER_PAIRS: list[AnswerPair] = [
    # ---------------------------------------------------------------------------------------------- latex
    AnswerPair("latex", "So $x = \\boxed{\\frac{\\sqrt{3}}{2}}$.", "\\frac{\\sqrt{3}}{2}", True),
    AnswerPair("latex", "<answer>\\frac{1}{2}\\sqrt{3}</answer>", "\\frac{\\sqrt{3}}{2}", True),
    AnswerPair("latex", "The area is \\boxed{2\\sqrt{3}}.", "\\sqrt{12}", True),
    AnswerPair("latex", "The area is \\boxed{3\\sqrt{2}}.", "2\\sqrt{3}", False),
    AnswerPair("latex", "<answer>2\\pi</answer>", "2\\pi", True),
    AnswerPair("latex", "Hence the circumference is $\\boxed{6.28}$.", "2\\pi", False),  # rounded: not 2*pi
    AnswerPair("latex", "\\boxed{(x+1)^2}", "x^2+2x+1", True),
    AnswerPair("latex", "\\boxed{(x-1)^2}", "x^2+2x+1", False),
    AnswerPair("latex", "<answer>x = 5</answer>", "5", True),  # the value, stated as an equation
    AnswerPair("latex", "The answer is \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    AnswerPair("latex", "The answer is \\boxed{(3, \\pi)}.", "\\left( 3, \\frac{\\pi}{2} \\right)", False),
    AnswerPair("latex", "\\boxed{-\\dfrac{7}{4}}", "-\\frac{7}{4}", True),
    AnswerPair("latex", "\\boxed{\\infty}", "\\infty", True),
    AnswerPair("latex", "<answer>\\sqrt{2}</answer>", "\\frac{\\sqrt{2}}{2}", False),
    AnswerPair("latex", "<answer>\\frac{1}{\\sqrt{2}}</answer>", "\\frac{\\sqrt{2}}{2}", True),
    AnswerPair("latex", "We get \\boxed{10^{3}}", "1000", True),
    AnswerPair("latex", "\\boxed{e^{2}}", "e^2", True),
    AnswerPair("latex", "\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", True),
    AnswerPair("latex", "\\boxed{\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", False),
    AnswerPair("latex", "<answer>3^{4}</answer>", "81", True),
    # ---------------------------------------------------------------------------------------------- units
    AnswerPair("units", "<answer>5 cm</answer>", "5", True),
    AnswerPair("units", "The length is \\boxed{5\\text{ cm}}.", "5", True),
    AnswerPair("units", "<answer>\\$18</answer>", "18", True),
    AnswerPair("units", "<answer>18 dollars</answer>", "18", True),
    AnswerPair("units", "<answer>$18.00</answer>", "18", True),  # a dollar sign, not LaTeX
    AnswerPair("units", "\\boxed{90^\\circ}", "90", True),
    AnswerPair("units", "\\boxed{90^{\\circ}}", "45", False),
    AnswerPair("units", "<answer>3 hours</answer>", "3", True),
    AnswerPair("units", "<answer>12 km/h</answer>", "12", True),
    AnswerPair("units", "<answer>50\\%</answer>", "50", True),  # the question asks for a percentage
    AnswerPair("units", "<answer>25%</answer>", "50", False),
    AnswerPair("units", "<answer>1,000 meters</answer>", "1000", True),
    AnswerPair("units", "<answer>2.5 kg</answer>", "2.5", True),
    AnswerPair("units", "<answer>\\$1,234.50</answer>", "1234.5", True),
    AnswerPair("units", "<answer>7 apples</answer>", "7", True),
    AnswerPair("units", "<answer>8 apples</answer>", "7", False),
    AnswerPair("units", "\\boxed{4\\text{ inches}}", "4 \\text{ inches}", True),
    AnswerPair("units", "\\boxed{40 \\text{ mph}}", "4", False),
    # ---------------------------------------------------------------------------------------------- sets
    AnswerPair("sets", "\\boxed{\\{1, 2, 3\\}}", "\\{3, 2, 1\\}", True),
    AnswerPair("sets", "<answer>1, 2, 3</answer>", "\\{1,2,3\\}", True),
    AnswerPair("sets", "<answer>1, 2</answer>", "\\{1,2,3\\}", False),
    AnswerPair("sets", "The solutions are \\boxed{2, -3}.", "-3, 2", True),
    AnswerPair("sets", "The solutions are \\boxed{2, 3}.", "-3, 2", False),
    AnswerPair("sets", "<answer>x = 2 or x = -3</answer>", "-3, 2", True),
    AnswerPair("sets", "<answer>x=\\pm 2</answer>", "-2, 2", True),
    AnswerPair("sets", "\\boxed{[0, 1)}", "[0,1)", True),
    AnswerPair("sets", "\\boxed{[0, 1]}", "[0,1)", False),
    AnswerPair("sets", "\\boxed{(-\\infty, 2]}", "(-\\infty,2]", True),
    AnswerPair("sets", "\\boxed{(-\\infty, 2)}", "(-\\infty,2]", False),
    AnswerPair("sets", "\\boxed{(-\\infty, -1) \\cup (1, \\infty)}", "(-\\infty,-1)\\cup(1,\\infty)", True),
    AnswerPair("sets", "\\boxed{\\{-1, 1\\}}", "\\{1, -1\\}", True),
    AnswerPair("sets", "<answer>\\{5\\}</answer>", "5", True),  # a one-element solution set
    AnswerPair("sets", "\\boxed{\\{1, 2, 2\\}}", "\\{1, 2\\}", True),  # sets have no duplicates
    AnswerPair("sets", "\\boxed{(1, 2)}", "(2, 1)", False),  # ordered pairs (a point), not sets
    AnswerPair("sets", "\\boxed{\\emptyset}", "\\varnothing", True),
    AnswerPair("sets", "<answer>3, 5, 7</answer>", "3, 5, 7", True),
    # ---------------------------------------------------------------------------------------------- gsm8k
    AnswerPair("gsm8k", "She sold 24 in May, so 48 + 24 = 72.\n#### 72", _GSM_CLIPS, True),
    AnswerPair("gsm8k", "48 / 2 = 24 and 48 + 24 = 72.\n#### 70", _GSM_CLIPS, False),
    AnswerPair("gsm8k", "<answer>72</answer>", _GSM_CLIPS, True),
    AnswerPair("gsm8k", "<answer>24</answer>", _GSM_CLIPS, False),  # an intermediate result
    AnswerPair("gsm8k", "In May she sold 24 clips. The answer is 72.", _GSM_CLIPS, True),
    AnswerPair("gsm8k", "She earns 0.2 dollars a minute, 0.2 * 50 = 10.\n#### $10", _GSM_WENG, True),
    AnswerPair("gsm8k", "<answer>$10.00</answer>", _GSM_WENG, True),
    AnswerPair("gsm8k", "<answer>$12</answer>", _GSM_WENG, False),
    AnswerPair("gsm8k", "Betty still needs 5 dollars.\n#### 5", _GSM_BETTY, True),
    AnswerPair("gsm8k", "She needs 100 - 50 - 30 - 15 = 5 more, so \\boxed{5}.", _GSM_BETTY, True),
    AnswerPair("gsm8k", "She needs \\boxed{15} more.", _GSM_BETTY, False),
    AnswerPair("gsm8k", "He writes 624 pages a year.\n#### 624", _GSM_JAMES, True),
    AnswerPair("gsm8k", "6 pages twice a week is 12, times 52 weeks.\n#### 624 pages", _GSM_JAMES, True),
    AnswerPair("gsm8k", "#### 1,080", _GSM_BIG, True),
    AnswerPair("gsm8k", "#### 1,008", _GSM_BIG, False),
    AnswerPair("gsm8k", "<answer>2.50</answer>", _GSM_DEC, True),
    AnswerPair("gsm8k", "<answer>5/2</answer>", _GSM_DEC, True),
    AnswerPair("gsm8k", "<answer>-5</answer>", _GSM_NEG, True),
    AnswerPair("gsm8k", "<answer>5</answer>", _GSM_NEG, False),
    AnswerPair("gsm8k", "I cannot solve this one.", _GSM_CLIPS, False),
    # ---------------------------------------------------------------------------------------------- fractions
    AnswerPair("fractions", "<answer>3/4</answer>", "\\frac{3}{4}", True),
    AnswerPair("fractions", "<answer>0.75</answer>", "\\frac{3}{4}", True),
    AnswerPair("fractions", "\\boxed{\\dfrac{6}{8}}", "3/4", True),
    AnswerPair("fractions", "\\boxed{\\tfrac{5}{2}}", "2.5", True),
    AnswerPair("fractions", "\\boxed{\\frac12}", "1/2", True),
    AnswerPair("fractions", "<answer>2/4</answer>", "1/2", True),
    AnswerPair("fractions", "<answer>-1/2</answer>", "-\\frac{1}{2}", True),
    AnswerPair("fractions", "\\boxed{\\frac{-1}{2}}", "-\\frac{1}{2}", True),
    AnswerPair("fractions", "\\boxed{\\frac{1}{2}}", "-\\frac{1}{2}", False),
    AnswerPair("fractions", "\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", False),
    AnswerPair("fractions", "<answer>0.333</answer>", "\\frac{1}{3}", False),  # rounded, not equal
    AnswerPair("fractions", "<answer>1\\frac{1}{2}</answer>", "\\frac{3}{2}", True),  # mixed number
    AnswerPair("fractions", "<answer>1 1/2</answer>", "3/2", True),  # mixed number
    AnswerPair("fractions", "<answer>3/2</answer>", "2/3", False),
    AnswerPair("fractions", "\\boxed{\\frac{10}{4}}", "\\frac{5}{2}", True),
    AnswerPair("fractions", "\\boxed{\\frac{\\frac{1}{2}}{2}}", "\\frac{1}{4}", True),
    AnswerPair("fractions", "<answer>\\frac{22}{7}</answer>", "\\pi", False),
    AnswerPair("fractions", "<answer>1/0</answer>", "1", False),
    # ---------------------------------------------------------------------------------------------- answer_is
    AnswerPair("answer_is", "Adding them up, the answer is 42.", "42", True),
    AnswerPair("answer_is", "Adding them up, the answer is 41.", "42", False),
    AnswerPair("answer_is", "So the final answer is $\\frac{1}{2}$.", "1/2", True),
    AnswerPair("answer_is", "The answer is: 7", "7", True),
    AnswerPair("answer_is", "Therefore, the answer is 12 apples.", "12", True),
    AnswerPair("answer_is", "The answer is 5. Check: 5 + 0 = 5.", "5", True),
    AnswerPair("answer_is", "The answer is x = 5.", "5", True),
    AnswerPair("answer_is", "The answer is 2.50.", "2.5", True),
    AnswerPair("answer_is", "Answer: 42", "42", True),
    AnswerPair("answer_is", "Final Answer: The final answer is $6$. I hope it is correct.", "6", True),
    AnswerPair("answer_is", "Final Answer: The final answer is $8$. I hope it is correct.", "6", False),
    AnswerPair("answer_is", "I first thought the answer is 7, but after checking, the answer is 8.", "8", True),
    AnswerPair("answer_is", "I first thought the answer is 8, but after checking, the answer is 7.", "8", False),
    AnswerPair("answer_is", "The correct answer is 3/4.", "0.75", True),
    AnswerPair("answer_is", "the answer is \\frac{3}{4}.", "0.75", True),
    AnswerPair("answer_is", "I don't know.", "7", False),
    AnswerPair("answer_is", "The answer is 100, since 10 * 10 = 100.", "100", True),
    AnswerPair("answer_is", "Thus the final answer is 1,000.", "1000", True),
]
# fmt: on

_GSM_MARBLES = "Mark has 3 + 4 = <<3+4=7>>7 marbles.\nHe gives away 2, so 7 - 2 = <<7-2=5>>5.\n#### 5"
_GSM_COST = "The total cost is 4 * 12.5 = <<4*12.5=50>>50.\n#### 50"
_GSM_SAVINGS = "She saves 2500 + 500 = <<2500+500=3000>>3000.\n#### 3000"

# fmt: off
_HELD_OUT: list[tuple[str, str, str, bool]] = [
    ("latex", "\\boxed{\\frac{\\pi}{4}}", "\\frac{\\pi}{4}", True),
    ("latex", "<answer>\\pi/4</answer>", "\\frac{\\pi}{4}", True),
    ("latex", "\\boxed{\\sqrt{8}}", "2\\sqrt{2}", True),
    ("latex", "\\boxed{\\sqrt{8}}", "4\\sqrt{2}", False),
    ("latex", "The value is $\\boxed{\\log_2 8}$.", "3", True),
    ("latex", "<answer>y = 2x + 3</answer>", "y = 2x + 3", True),
    ("latex", "\\boxed{\\frac{a+b}{2}}", "\\frac{b+a}{2}", True),
    ("latex", "\\boxed{a^2 - b^2}", "(a-b)(a+b)", True),
    ("units", "<answer>15 minutes</answer>", "15", True),
    ("units", "<answer>\\$5.50</answer>", "5.5", True),
    ("units", "The total is \\boxed{\\$42}.", "42", True),
    ("units", "<answer>60 km</answer>", "6", False),
    ("units", "<answer>45°</answer>", "45", True),
    ("units", "\\boxed{12\\,\\text{cm}^2}", "12", True),
    ("units", "<answer>3.5 hours</answer>", "3.5", True),
    ("units", "<answer>20 percent</answer>", "20", True),
    ("sets", "\\boxed{\\{2, 4, 6\\}}", "\\{6, 4, 2\\}", True),
    ("sets", "<answer>x = 1, x = 4</answer>", "1, 4", True),
    ("sets", "<answer>1 and 4</answer>", "4, 1", True),
    ("sets", "\\boxed{(2, 5]}", "(2,5]", True),
    ("sets", "\\boxed{(2, 5)}", "(2,5]", False),
    ("sets", "<answer>\\{1, 3\\}</answer>", "\\{1, 2, 3\\}", False),
    ("sets", "\\boxed{x \\in [1, 3]}", "[1,3]", True),
    ("gsm8k", "He has 7, gives away 2.\n#### 5", _GSM_MARBLES, True),
    ("gsm8k", "<answer>7</answer>", _GSM_MARBLES, False),
    ("gsm8k", "So the total cost is $50.\n#### 50.00", _GSM_COST, True),
    ("gsm8k", "The answer is \\$50.", _GSM_COST, True),
    ("gsm8k", "#### 3,000", _GSM_SAVINGS, True),
    ("gsm8k", "#### 300", _GSM_SAVINGS, False),
    ("gsm8k", "Therefore she has 3000 dollars in total.", _GSM_SAVINGS, True),  # right, but with no marker
    ("fractions", "<answer>7/8</answer>", "0.875", True),
    ("fractions", "\\boxed{\\frac{14}{16}}", "\\frac{7}{8}", True),
    ("fractions", "<answer>0.87</answer>", "\\frac{7}{8}", False),
    ("fractions", "\\boxed{2\\frac{1}{3}}", "\\frac{7}{3}", True),
    ("fractions", "<answer>-3/4</answer>", "\\frac{-3}{4}", True),
    ("fractions", "<answer>4/3</answer>", "\\frac{3}{4}", False),
    ("fractions", "\\boxed{\\frac{2}{6}}", "\\frac{1}{3}", True),
    ("answer_is", "So, the answer is 64.", "64", True),
    ("answer_is", "The final answer is 9 cm.", "9", True),
    ("answer_is", "The answer should be 15", "15", True),
    ("answer_is", "Hence the answer is -2.", "-2", True),
    ("answer_is", "Hence the answer is 2.", "-2", False),
    ("answer_is", "My final answer: 11", "11", True),
    ("answer_is", "The answer is 1/3, which is about 0.33.", "\\frac{1}{3}", True),
]
# fmt: on
ANSWER_PAIRS += [AnswerPair(*p, held_out=True) for p in _HELD_OUT]

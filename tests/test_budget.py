import pytest

from ctxc import Budget, BudgetError
from ctxc.budget import parse_size


@pytest.mark.parametrize(
    "spec,n_in,expected",
    [("4k", 10**6, 4000), ("4096", 10, 4096), ("1.5k", 10**6, 1500), ("25%", 1000, 250), ("x4", 1000, 250),
     ("x4", 3, 1), ("100%", 77, 77), ("4X", 100, 25), ("10x", 100, 10), ("2_000", 5, 2000), ("1m", 5, 10**6),
     (512, 5, 512), ("x1.5", 300, 200)],
)
def test_parse_and_resolve(spec, n_in, expected):
    assert Budget.parse(spec).resolve(n_in) == expected


@pytest.mark.parametrize("spec", ["4q", "0", "-5", "abc", "", "0%", "150%", "x0.5", "x", "1.5", "4k4", "k", None, 1.5])
def test_bad_budgets_raise_one_clear_error(spec):
    with pytest.raises(BudgetError) as err:
        Budget.parse(spec)
    line = err.value.one_line()
    assert "\n" not in line and "budget" in line and "e.g." in line


def test_parse_size():
    assert parse_size("2G") == 2 * 1024**3
    assert parse_size("500M") == 500 * 1024**2
    assert parse_size("123") == 123
    with pytest.raises(BudgetError):
        parse_size("lots")

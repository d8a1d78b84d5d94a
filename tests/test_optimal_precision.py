"""The one overflow policy (``precision.Overflow``) that estimate, diagnose and floor use."""

import pytest
import torch

from lossfloor.errors import ParameterError
from lossfloor.optimal.precision import Overflow, finite


def _overflowing_in(bad: set[torch.dtype], calls: list[torch.dtype]):
    def compute(dtype: torch.dtype) -> torch.Tensor:
        calls.append(dtype)
        return torch.tensor([float("inf") if dtype in bad else 1.0], dtype=torch.float64)

    return compute


def test_auto_computes_again_in_float64_where_float32_overflows():
    calls: list[torch.dtype] = []
    value, dtype = Overflow("auto").run(
        0.5, torch.float32, _overflowing_in({torch.float32}, calls), finite
    )
    assert dtype == torch.float64 and calls == [torch.float32, torch.float64]
    assert value.tolist() == [1.0]


def test_finite_values_are_kept_in_their_dtype_without_a_second_computation():
    calls: list[torch.dtype] = []
    _, dtype = Overflow("auto").run(0.5, torch.float32, _overflowing_in(set(), calls), finite)
    assert dtype == torch.float32 and calls == [torch.float32]


@pytest.mark.parametrize(
    ("precision", "dtype", "hint"),
    [
        ("float32", torch.float32, True),
        ("auto", torch.float64, False),
        ("float64", torch.float64, False),
    ],
)
def test_a_fixed_precision_or_float64_that_overflows_is_refused_in_one_line(precision, dtype, hint):
    calls: list[torch.dtype] = []
    bad = {torch.float32, torch.float64}
    with pytest.raises(ParameterError) as exc:
        Overflow(precision).run(0.5, dtype, _overflowing_in(bad, calls), finite)
    assert calls == [dtype] and exc.value.param == "sigmas"
    assert f"overflows {str(dtype).removeprefix('torch.')}" in str(exc.value)
    assert ("choose precision float64" in str(exc.value)) == hint


def test_torch_overflow_errors_count_as_overflow_and_other_errors_pass_through():
    def raising(message: str):
        def compute(dtype: torch.dtype) -> torch.Tensor:
            if dtype == torch.float32:
                raise RuntimeError(message)
            return torch.ones(1)

        return compute

    overflow = "value cannot be converted to type float without overflow"
    assert Overflow("auto").run(1.0, torch.float32, raising(overflow), finite)[1] == torch.float64
    with pytest.raises(RuntimeError, match="shape mismatch"):
        Overflow("auto").run(1.0, torch.float32, raising("shape mismatch"), finite)
